"""Image references: keruta accepts what the kubelet can pull by name, and refuses (one line, at once) what
the kubelet would refuse later as InvalidImageName. The cases follow distribution/reference's grammar,
the rules the kubelet parses image names by."""

from __future__ import annotations

import pytest

from keruta_prefect.models import TaskSpecError, parse_task_spec
from keruta_prefect.validation import check_image

VALID = [
    "busybox", "busybox:1.36", "library/busybox", "docker.io/library/busybox:latest",
    "registry.example.com/keruta-agent:1.0", "localhost:5000/a/b_c/d__e/f-g--h:v1.2-rc_3",
    "[::1]:5000/x", "Registry.Example.COM/team/app", "my_registry/x",
    "x@sha256:" + "a" * 64, "x:tag@sha512:" + "0" * 128, "a" * 200 + "/b",
]
INVALID = [
    "", "x:é", "é", "Upper", "x/Upper", "x:", "x@", ":tag", "x:-tag", "x:" + "t" * 129,
    "a" * 64,  # an image id, not a name
    "x@sha256:" + "a" * 32, "x@md5:" + "a" * 32, "x@sha256:" + "A" * 64,
    "-registry.com/x", "registry-.com/x", "registry..com/x", "registry.com:port/x",
    "a/" + "b" * 300, "x y", "x//y", "x/", "/x", "x_", "x..y",
]


@pytest.mark.parametrize("image", VALID)
def test_a_name_the_kubelet_parses_is_accepted(image: str) -> None:
    assert check_image(image) == image


@pytest.mark.parametrize("image", INVALID)
def test_a_name_the_kubelet_refuses_is_refused_at_once_naming_the_field(image: str) -> None:
    with pytest.raises(ValueError, match="image reference"):
        check_image(image)
    with pytest.raises(TaskSpecError) as caught:
        parse_task_spec({"id": "img", "image": image, "script": "true"}, source="spec")
    line = str(caught.value)
    assert "image" in line and "\n" not in line

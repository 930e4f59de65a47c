"""kubernetes-validate for every Kubernetes version this project supports (1.31 through the newest shipped)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import kubernetes_validate

MIN_MINOR = 31


@functools.cache
def versions() -> list[str]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = sorted({p.name.split("-")[0].lstrip("v") for p in root.iterdir() if p.name.startswith("v1.")},
                   key=lambda v: tuple(int(x) for x in v.split(".")))
    return [v for v in found if int(v.split(".")[1]) >= MIN_MINOR]


def validate_all(manifest: dict[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError unless ``manifest`` is valid (strict) for every version."""
    for version in versions():
        kubernetes_validate.validate(manifest, version, strict=True)

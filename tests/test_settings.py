"""application.properties → settings: parsing edge cases, bad values, defaults, documentation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keruta_prefect.cli import main
from keruta_prefect.settings import (
    PROPERTY_KEYS,
    KerutaSettings,
    SettingsError,
    load_properties_file,
    parse_properties,
    settings_from_mapping,
    settings_markdown_table,
    settings_properties_file,
    settings_to_properties,
)

ROOT = Path(__file__).resolve().parent.parent


def props(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "application.properties"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_seed_keys_and_original_keys_are_accepted(tmp_path: Path) -> None:
    path = props(tmp_path, """
keruta.kubernetes.enabled=true
keruta.kubernetes.config-path=/path/to/kube/config
keruta.kubernetes.in-cluster=false
keruta.kubernetes.default-namespace=keruta-jobs
keruta.kubernetes.api-url=http://keruta-api.keruta.svc:8080
keruta.kubernetes.api-port=9090
keruta.kubernetes.default-image=registry.example.com/keruta-agent:1.2
keruta.kubernetes.default-pvc-storage-size=5Gi
keruta.kubernetes.default-pvc-access-mode=ReadWriteMany
keruta.kubernetes.default-pvc-storage-class=fast-ssd
""")
    s = load_properties_file(path)
    assert s.enabled is True
    assert s.config_path == "/path/to/kube/config"
    assert s.in_cluster is False
    assert s.default_namespace == "keruta-jobs"
    assert s.api_url == "http://keruta-api.keruta.svc:8080"
    assert s.api_port == 9090
    assert s.default_image == "registry.example.com/keruta-agent:1.2"
    assert s.default_pvc_storage_size == "5Gi"
    assert s.default_pvc_access_mode == "ReadWriteMany"
    assert s.default_pvc_storage_class == "fast-ssd"


def test_java_properties_syntax_escapes_continuations_and_unicode(tmp_path: Path) -> None:
    path = props(tmp_path, (
        "# a comment\n"
        "! another comment\n"
        "keruta.kubernetes.default-namespace : team-a\n"            # ':' separator and spaces
        "keruta.kubernetes.config-path=/home/u/kube\\\n"            # a continuation line
        "        /config\n"
        "keruta.kubernetes.context=ctx\\u00e9\\tx\n"                # \\uXXXX and \\t escapes
        "keruta.kubernetes.node-selector=disk\\=ssd,zone=a\n"       # an escaped '='
        "keruta.kubernetes.image-pull-secrets = one, two ,three\n"
        "keruta.kubernetes.default-pvc-storage-class=\n"             # empty means: the cluster default
    ))
    s = load_properties_file(path)
    assert s.default_namespace == "team-a"
    assert s.config_path == "/home/u/kube/config"
    assert s.context == "ctxé\tx"
    assert s.node_selector == {"disk": "ssd", "zone": "a"}
    assert s.image_pull_secrets == ["one", "two", "three"]
    assert s.default_pvc_storage_class is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("keruta.kubernetes.enabled=maybe", "keruta.kubernetes.enabled='maybe': expected true or false"),
        ("keruta.artifacts.max-file-size=-5Mi", "keruta.artifacts.max-file-size='-5Mi': must not be negative"),
        ("keruta.kubernetes.default-pvc-access-mode=ReadWriteSometimes",
         "keruta.kubernetes.default-pvc-access-mode='ReadWriteSometimes': allowed: ReadWriteOnce, ReadOnlyMany, "
         "ReadWriteMany or ReadWriteOncePod"),
        ("keruta.kubernetes.default-pvc-storage-size=lots", "keruta.kubernetes.default-pvc-storage-size='lots': "
         "expected a Kubernetes quantity"),
        ("keruta.kubernetes.default-namespace=Team_A", "keruta.kubernetes.default-namespace='Team_A': must be a "
         "DNS-1123 label"),
        ("keruta.kubernetes.api-port=70000", "keruta.kubernetes.api-port='70000': must be at most 65535"),
        ("keruta.kubernetes.api-port=eighty", "keruta.kubernetes.api-port='eighty': expected a whole number"),
        ("keruta.kubernetes.default-image=Not An Image", "keruta.kubernetes.default-image='Not An Image': must be an "
         "image reference"),
        ("keruta.kubernetes.api-url=keruta-api:8080", "keruta.kubernetes.api-url='keruta-api:8080': must be an "
         "http:// or https:// URL"),
        ("keruta.kubernetes.backoff-limit=-1", "keruta.kubernetes.backoff-limit='-1': must be at least 0"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_key_value_and_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, expected: str
) -> None:
    path = props(tmp_path, line + "\n")
    code = main(["settings", "show", "--properties", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("keruta-prefect: " + expected), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_keruta_keys_warn_by_name_and_others_are_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = props(tmp_path, "keruta.kubernetes.enabeld=true\nkeruta.foo=1\nspring.application.name=keruta\n")
    assert main(["settings", "show", "--properties", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: unknown keruta settings ignored: keruta.foo, keruta.kubernetes.enabeld" in err
    assert "spring" not in err


def test_a_key_set_twice_with_different_values_is_an_error(tmp_path: Path) -> None:
    path = props(tmp_path, "keruta.kubernetes.enabled=true\nkeruta.kubernetes.enabled=false\n")
    with pytest.raises(SettingsError, match=r"keruta.kubernetes.enabled is set twice \('true' and 'false'\)"):
        load_properties_file(path)


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    path = props(tmp_path, b"keruta.kubernetes.enabled=true\nkeruta.kubernetes.context=caf\xe9\n")
    with pytest.raises(SettingsError, match=r"line 2 is not valid UTF-8 \(byte 0xe9\)"):
        load_properties_file(path)


def test_missing_file_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings", "show", "--properties", "/nonexistent/app.properties"]) == 2
    err = capsys.readouterr().err
    assert err == ("keruta-prefect: cannot read properties file '/nonexistent/app.properties': "
                   "No such file or directory\n")


def test_settings_show_json_prints_the_effective_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = props(tmp_path, "keruta.kubernetes.default-namespace=jobs\nkeruta.artifacts.max-file-size=10Mi\n")
    assert main(["settings", "show", "--properties", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["default_namespace"] == "jobs"
    assert shown["artifacts_max_file_size"] == 10 * 2**20
    assert shown["enabled"] is True  # a default


def test_sizes_accept_quantities_and_plain_bytes() -> None:
    s = settings_from_mapping({"keruta.artifacts.max-file-size": "1048576", "keruta.artifacts.max-total-size": "2G"})
    assert s.artifacts_max_file_size == 1048576
    assert s.artifacts_max_total_size == 2_000_000_000


def test_blocks_default_properties_file_is_exactly_the_defaults() -> None:
    """blocks/application.properties documents every key with the value the code uses."""
    text = (ROOT / "blocks" / "application.properties").read_text()
    assert text == settings_properties_file(), "regenerate: keruta-prefect settings keys --format properties"
    parsed = parse_properties(text.encode())
    assert set(parsed) == set(PROPERTY_KEYS)
    assert settings_from_mapping(parsed) == KerutaSettings()


def test_readme_documents_every_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_markdown_table() in readme


def test_round_trip_through_properties_text() -> None:
    s = KerutaSettings(node_selector={"a": "b"}, image_pull_secrets=["x", "y"], default_cpu_limit="2")
    again = settings_from_mapping(settings_to_properties(s))
    assert again == s

"""Settings as Prefect Blocks: seeded only if absent; UI edits survive re-seeding; secrets stay secret."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate

from keruta_prefect.blocks import KerutaApiCredentials, KerutaKubernetesSettings, load_settings, seed
from keruta_prefect.cli import main
from keruta_prefect.settings import KerutaSettings, load_properties_file

pytestmark = pytest.mark.usefixtures("prefect_server")


def ui_edit(name: str, **changes: object) -> None:
    """Change a block document the way the Prefect UI's form does: PATCH /block_documents/{id}."""
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, KerutaKubernetesSettings.get_block_type_slug())
        data = {**document.data, **changes}
        client.update_block_document(document.id, BlockDocumentUpdate(data=data))


def test_seed_creates_once_and_a_ui_edit_survives_reseeding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"seed-{uuid.uuid4().hex[:8]}"
    properties = tmp_path / "application.properties"
    properties.write_text("keruta.kubernetes.default-namespace=from-file\nkeruta.kubernetes.default-image=agent:1\n")

    assert main(["blocks", "seed", "--properties", str(properties), "--name", name]) == 0
    out = capsys.readouterr().out
    assert f"keruta-kubernetes-settings/{name}: created" in out
    assert KerutaKubernetesSettings.load(name).default_namespace == "from-file"

    ui_edit(name, default_namespace="edited-in-ui", default_image="agent:2")
    assert main(["blocks", "seed", "--properties", str(properties), "--name", name]) == 0
    out = capsys.readouterr().out
    assert f"keruta-kubernetes-settings/{name}: kept (already present; use --force to overwrite)" in out
    stored = KerutaKubernetesSettings.load(name)
    assert (stored.default_namespace, stored.default_image) == ("edited-in-ui", "agent:2")

    assert main(["blocks", "seed", "--properties", str(properties), "--name", name, "--force"]) == 0
    assert KerutaKubernetesSettings.load(name).default_namespace == "from-file"


def test_seed_with_a_bad_properties_file_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    seed(KerutaSettings(default_namespace="before"), name=name)
    properties = tmp_path / "application.properties"
    properties.write_text("keruta.kubernetes.enabled=perhaps\n")
    assert main(["blocks", "seed", "--properties", str(properties), "--name", name, "--force"]) == 2
    assert capsys.readouterr().err == (
        "keruta-prefect: keruta.kubernetes.enabled='perhaps': expected true or false\n")
    assert KerutaKubernetesSettings.load(name).default_namespace == "before"


def test_the_block_is_the_settings_model_field_for_field() -> None:
    """The UI form shows every setting, each with a description naming its property key."""
    schema = KerutaKubernetesSettings.model_json_schema()["properties"]
    assert set(schema) == set(KerutaSettings.model_fields)
    for field, spec in schema.items():
        assert spec.get("description"), field
        assert "(`keruta." in spec["description"], field


def test_api_token_is_stored_as_a_secret_and_shown_obfuscated(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"api-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("KERUTA_API_TOKEN", "s3cret-token-value")
    seed(KerutaSettings(api_url="http://api.internal:8080"), name=name)
    loaded = KerutaApiCredentials.load(name)
    assert loaded.url == "http://api.internal:8080"
    assert loaded.token.get_secret_value() == "s3cret-token-value"
    assert "s3cret" not in repr(loaded)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "keruta-api", include_secrets=False)
    assert document.data["token"] != "s3cret-token-value"


def test_first_use_seeds_from_keruta_properties(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"first-{uuid.uuid4().hex[:8]}"
    properties = tmp_path / "app.properties"
    properties.write_text("keruta.task.max-attempts=5\n")
    monkeypatch.setenv("KERUTA_PROPERTIES", str(properties))
    assert load_settings(name).task_max_attempts == 5
    properties.write_text("keruta.task.max-attempts=9\n")  # the stored copy wins from now on
    assert load_settings(name).task_max_attempts == 5
    assert load_properties_file(properties).task_max_attempts == 9

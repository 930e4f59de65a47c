"""keruta.kubernetes.credentials-block: the cluster connection from a prefect-kubernetes block (KubernetesCredentials
or KubernetesClusterConfig, as Prefect workers use), against the harness cluster and the session's Prefect server.

The blocks are made the way a Prefect user makes them (``KubernetesClusterConfig.from_file`` of the cluster's
kubeconfig, saved on the Prefect server); the settings name only the block (no config path), and the harness
listens on a port of its own per test: a task that reaches it went through the block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from keruta_harness.cluster import Cluster
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

from keruta_prefect.blocks import KerutaKubernetesSettings, seed
from keruta_prefect.cli import main
from keruta_prefect.flows import KerutaTaskFailed, keruta_task
from keruta_prefect.manifest import job_name
from keruta_prefect.settings import (
    CREDENTIALS_BLOCK_TYPES,
    KerutaSettings,
    SettingsError,
    credentials_block_ref,
    settings_from_mapping,
)
from keruta_prefect.store import Store
from tests.conftest import Api

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "keruta-prefect"
KEY = "keruta.kubernetes.credentials-block"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def save_credentials(cluster: Cluster, *, kind: str = "kubernetes-credentials", kubeconfig: Path | None = None) -> str:
    """A prefect-kubernetes block made from the cluster's kubeconfig, saved on the Prefect server; its setting value."""
    config = KubernetesClusterConfig.from_file(kubeconfig or cluster.kubeconfig())
    name = unique(kind.split("-")[1])
    if kind == "kubernetes-credentials":
        KubernetesCredentials(cluster_config=config).save(name)
        return name  # a bare name is a KubernetesCredentials block
    config.save(name)
    return f"{kind}/{name}"


def properties(tmp_path: Path, **values: str) -> Path:
    path = tmp_path / f"{unique('settings')}.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


# --- the setting, offline -------------------------------------------------------------------------------

def test_the_block_is_named_by_slug_or_by_bare_name_and_the_slugs_are_prefect_kubernetes_own() -> None:
    slugs = (KubernetesCredentials.get_block_type_slug(), KubernetesClusterConfig.get_block_type_slug())
    assert slugs == CREDENTIALS_BLOCK_TYPES
    assert credentials_block_ref("prod") == ("kubernetes-credentials", "prod")
    assert credentials_block_ref("kubernetes-credentials/prod") == ("kubernetes-credentials", "prod")
    assert credentials_block_ref("kubernetes-cluster-config/prod-2") == ("kubernetes-cluster-config", "prod-2")
    for bad in ("Prod", "secret/prod", "kubernetes-credentials/", "a/b/c", "kubernetes-job/x", "/prod"):
        with pytest.raises(SettingsError) as raised:
            settings_from_mapping({KEY: bad})
        assert str(raised.value) == (
            f"{KEY}={bad!r}: must be kubernetes-credentials/NAME, kubernetes-cluster-config/NAME or NAME "
            "(a prefect-kubernetes block; NAME: lowercase letters, digits and '-')")
    assert settings_from_mapping({KEY: ""}).credentials_block is None


@pytest.mark.parametrize(("values", "line"), [
    ({KEY: "prod", "keruta.kubernetes.config-path": "/etc/kubeconfig"},
     f"{KEY}='prod': keruta.kubernetes.config-path='/etc/kubeconfig' is a second cluster connection"),
    ({KEY: "prod", "keruta.kubernetes.context": "admin"},
     f"{KEY}='prod': keruta.kubernetes.context='admin' is a second cluster connection"),
    ({KEY: "prod", "keruta.kubernetes.in-cluster": "true"},
     f"{KEY}='prod': keruta.kubernetes.in-cluster=true is a second cluster connection"),
    ({"keruta.kubernetes.in-cluster": "true", "keruta.kubernetes.config-path": "/etc/kubeconfig"},
     "keruta.kubernetes.in-cluster='true': keruta.kubernetes.config-path='/etc/kubeconfig' is a second cluster "
     "connection"),
])
def test_two_connections_are_one_line_naming_both(values: dict[str, str], line: str) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from_mapping(values)
    assert str(raised.value).startswith(line) and "\n" not in str(raised.value)
    assert str(raised.value).endswith("keep one (a kubeconfig and its context, in-cluster, or a credentials block)")


def test_a_kubeconfig_with_its_context_is_one_connection_and_so_is_a_block_alone() -> None:
    both = settings_from_mapping({"keruta.kubernetes.config-path": "/k", "keruta.kubernetes.context": "c"})
    assert (both.config_path, both.context, both.credentials_block) == ("/k", "c", None)
    assert settings_from_mapping({KEY: "prod", "keruta.kubernetes.in-cluster": "false"}).credentials_block == "prod"
    settings = KerutaSettings(credentials_block="prod")
    with pytest.raises(ValueError, match="credentials-block='prod' is a second cluster connection"):
        settings.config_path = "/k"  # assignment is checked too (as the Prefect UI form saves one field)


def test_the_settings_block_form_has_the_field_with_its_key() -> None:
    """The Prefect UI edits it like every other setting."""
    field = KerutaKubernetesSettings.model_fields["credentials_block"]
    assert field.description and f"(`{KEY}`)" in field.description
    schema = KerutaKubernetesSettings.model_json_schema()["properties"]["credentials_block"]
    assert schema["property"] == KEY and schema["examples"] == ["kubernetes-credentials/my-cluster"]


@pytest.mark.usefixtures("prefect_server")
def test_a_second_connection_set_in_the_ui_is_one_line_when_the_settings_are_read() -> None:
    """The Prefect UI saves what its form holds (the server checks types only): the rule holds when read."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    from keruta_prefect.blocks import load_settings

    name = unique("ui")
    seed(KerutaSettings(credentials_block="prod"), name=name)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, KerutaKubernetesSettings.get_block_type_slug())
        client.update_block_document(document.id, BlockDocumentUpdate(data={"config_path": "/etc/kubeconfig"}))
    with pytest.raises(SettingsError) as raised:
        load_settings(name)
    assert str(raised.value).startswith(
        f"block keruta-kubernetes-settings/{name}: credentials_block='prod': keruta.kubernetes.config-path="
        "'/etc/kubeconfig' is a second cluster connection; keep one"), str(raised.value)


# --- against the harness ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("prefect_server")
def test_a_task_runs_on_the_cluster_of_a_credentials_block(cluster: Cluster, api: Api, store: Store) -> None:
    from keruta_prefect.backends.kubernetes.client import connection

    cluster.create_secret("keruta-api-token", {"token": api.token})
    block, value = unique("k8s"), save_credentials(cluster)
    settings = cluster.settings(config_path="", credentials_block=value, api_url=api.url, artifacts_mode="off")
    seed(settings, name=block)
    state = keruta_task(task_spec={"id": "cb-ok", "script": "echo through the block"}, backend="kubernetes",
                        settings_block=block, return_state=True)
    try:
        result = state.result()
    except KerutaTaskFailed as exc:
        result = exc.result
    assert (result.status, result.exit_code, result.backend) == ("COMPLETED", 0, "kubernetes")
    assert result.job_name == job_name("cb-ok", 1)
    assert [r.message for r in store.logs("cb-ok") if r.source.startswith("agent-")] == ["through the block"]
    [job] = cluster.jobs()
    assert job["metadata"]["labels"]["keruta.io/task-id"] == "cb-ok"
    api_client, used = connection(settings)  # the client the flow used (one per connection and process)
    assert api_client.configuration.host == cluster.url and used.startswith(f"credentials block {value!r} (context ")


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("a quiet harness cluster (nothing runs) whose URL and requests the test reads")
def test_doctor_and_render_use_a_cluster_config_block_and_say_so(
        tmp_path: Path, manual_cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    manual_cluster.create_secret("keruta-api-token", {"token": "t"})
    value = save_credentials(manual_cluster, kind="kubernetes-cluster-config")
    props = properties(tmp_path, **{KEY: value, "keruta.kubernetes.default-image": "keruta-agent:0.1.0"})
    assert main(["doctor", "--properties", str(props)]) == 0
    out = capsys.readouterr().out
    assert (f"✓ cluster reachable at {manual_cluster.url} (Kubernetes " in out
            and f"; connection: credentials block {value!r} (context harness)\n" in out), out
    assert out.rstrip().endswith("0 failed")

    task = tmp_path / "task.json"
    task.write_text(json.dumps({"id": "cb-dry", "script": "ls"}))
    assert main(["render", "--task-file", str(task), "--properties", str(props), "--server-dry-run"]) == 0
    assert "✓ the cluster accepts Job default/" in capsys.readouterr().err
    assert [c.name for c in manual_cluster.calls_of("create", "jobs")][-1].startswith("keruta-cb-dry-")


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("a quiet harness cluster (nothing runs) whose URL and requests the test reads")
def test_a_block_whose_cluster_does_not_answer_is_what_doctor_reports_for_a_kubeconfig(
        tmp_path: Path, manual_cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    dead = tmp_path / "dead.json"
    dead.write_text(manual_cluster.kubeconfig().read_text().replace(manual_cluster.url, "http://127.0.0.1:9"))
    value = save_credentials(manual_cluster, kubeconfig=dead)
    assert main(["doctor", "--properties", str(properties(tmp_path, **{KEY: value}))]) == 1
    out = capsys.readouterr().out
    assert out.startswith("✗ cannot reach the cluster at http://127.0.0.1:9: "), out
    assert f"; connection: credentials block {value!r} (context harness)\n    fix: edit the block {value!r} " in out
    # a context the block's kubeconfig does not have (edited in the UI): the block is what to mend
    value = unique("lost")
    KubernetesClusterConfig(config=json.loads(manual_cluster.kubeconfig().read_text()), context_name="gone").save(value)
    value = f"kubernetes-cluster-config/{value}"
    assert main(["doctor", "--properties", str(properties(tmp_path, **{KEY: value}))]) == 1
    out = capsys.readouterr().out
    assert f"\n    fix: edit the block {value!r} (its kubeconfig and context name: Prefect UI → Blocks)" in out, out


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.harness_only("a quiet harness cluster (nothing runs) whose URL and requests the test reads")
def test_an_edit_of_the_block_applies_to_the_next_client(manual_cluster: Cluster, tmp_path: Path) -> None:
    """The block is read each time a backend is built (not cached by name): an edit made in the Prefect UI
    is used from the next flow run; the same content keeps the same client."""
    from keruta_prefect.backends.kubernetes.client import connection

    dead = tmp_path / "dead.json"
    dead.write_text(manual_cluster.kubeconfig().read_text().replace(manual_cluster.url, "http://127.0.0.1:9"))
    name = unique("edited")
    KubernetesClusterConfig.from_file(dead).save(name)
    settings = KerutaSettings(credentials_block=f"kubernetes-cluster-config/{name}")
    first, _ = connection(settings)
    assert first.configuration.host == "http://127.0.0.1:9"
    assert connection(settings)[0] is first
    KubernetesClusterConfig.from_file(manual_cluster.kubeconfig()).save(name, overwrite=True)
    assert connection(settings)[0].configuration.host == manual_cluster.url


# --- from the command line, as a user sees it -------------------------------------------------------------

@pytest.fixture
def user_env(tmp_path: Path, prefect_server: None) -> dict[str, str]:
    """A fresh user's environment (own homes), talking to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KERUTA_", "PREFECT_API_", "PREFECT_SERVER_EPHEMERAL", "KUBECONFIG"))}
    env.update(KERUTA_HOME=str(tmp_path / "keruta-home"), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=str(PREFECT_API_URL.value()),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def cli(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], env={**env, **extra}, capture_output=True, text=True, timeout=240,
                          cwd=ROOT)


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_two_connections_on_the_command_line_are_one_line_and_exit_2(tmp_path: Path, user_env: dict[str, str]) -> None:
    props = properties(tmp_path, **{"keruta.kubernetes.config-path": "/etc/kubeconfig", KEY: "prod"})
    for command in (["doctor"], ["render", "--task-file", str(ROOT / "examples" / "hello.json")]):
        err = one_error_line(cli(user_env, *command, "--properties", str(props)), 2)
        assert err == (f"keruta-prefect: {KEY}='prod': keruta.kubernetes.config-path='/etc/kubeconfig' is a second "
                       "cluster connection; keep one (a kubeconfig and its context, in-cluster, or a credentials "
                       "block)\n")


def test_a_block_that_does_not_exist_is_one_line_and_exit_2(tmp_path: Path, user_env: dict[str, str]) -> None:
    for command, value, slug in (
            (["doctor"], "no-such-block", "kubernetes-credentials"),
            (["render", "--task-file", str(ROOT / "examples" / "hello.json"), "--server-dry-run"],
             "kubernetes-cluster-config/no-such-block", "kubernetes-cluster-config")):
        props = properties(tmp_path, **{KEY: value})
        err = one_error_line(cli(user_env, *command, "--properties", str(props)), 2)
        assert err.startswith(f"keruta-prefect: {KEY}={value!r}: no block {slug}/no-such-block in the Prefect "
                              "server; create it"), err


def test_a_task_run_with_a_missing_block_is_one_line_and_exit_2(tmp_path: Path, user_env: dict[str, str]) -> None:
    from keruta_prefect.blocks import seed as seed_here

    block = unique("missing")
    seed_here(KerutaSettings(credentials_block="no-such-block"), name=block)
    err = one_error_line(cli(user_env, "run", "--task-file", str(ROOT / "examples" / "hello.json"), "--backend",
                             "kubernetes", "--settings-block", block), 2)
    assert err.startswith(f"keruta-prefect: {KEY}='no-such-block': no block kubernetes-credentials/no-such-block"), err


@pytest.mark.harness_only("a quiet harness cluster (nothing runs) whose URL and requests the test reads")
def test_credentials_without_a_cluster_config_fall_back_as_prefect_kubernetes_does(
        manual_cluster: Cluster, tmp_path: Path, user_env: dict[str, str]) -> None:
    """No in-cluster service account here, so the default kubeconfig ($KUBECONFIG): the harness."""
    name = unique("ambient")
    KubernetesCredentials().save(name)
    manual_cluster.create_secret("keruta-api-token", {"token": "t"})
    props = properties(tmp_path, **{KEY: name})
    result = cli(user_env, "doctor", "--properties", str(props), KUBECONFIG=str(manual_cluster.kubeconfig()))
    assert result.returncode in (0, 1), result.stderr
    line = result.stdout.splitlines()[0]
    assert line.startswith(f"✓ cluster reachable at {manual_cluster.url} (Kubernetes "), result.stdout
    assert line.endswith(f"; connection: credentials block {name!r} (no cluster config: kubeconfig $KUBECONFIG or "
                         "~/.kube/config (context harness))"), line


@pytest.mark.harness_only("a quiet harness cluster (nothing runs) whose URL and requests the test reads")
def test_doctor_json_names_the_connection(manual_cluster: Cluster, tmp_path: Path, user_env: dict[str, str]) -> None:
    value = save_credentials(manual_cluster)
    result = cli(user_env, "doctor", "--json", "--properties", str(properties(tmp_path, **{KEY: value})))
    checks: list[dict[str, Any]] = json.loads(result.stdout)
    assert checks[0]["ok"] and checks[0]["text"].endswith(f"connection: credentials block {value!r} (context harness)")

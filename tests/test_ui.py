"""The Prefect UI as users see it, in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
the settings block's edit form (our admin screen) and a finished keruta flow run with its artifacts.
Screenshots are kept in test-output/ui/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from keruta_harness.processes import free_port, prefect_server

from tests.conftest import OUTPUT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("KERUTA_REQUIRE_BROWSER") != "1":
    pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)", allow_module_level=True)

SHOTS = OUTPUT / "ui"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Prefect server with its UI (the test harness serves the API only), on loopback."""
    home = tmp_path_factory.mktemp("ui")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "KERUTA_HOME": str(home / "keruta"),
           "KERUTA_DATABASE_URL": f"sqlite:///{home / 'keruta.db'}"}
    with prefect_server(env, home / "server.log", port) as base:
        yield base, env


@pytest.fixture(scope="module")
def finished_run(ui_server: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> str:
    """One keruta task run through the CLI against that server: returns its flow run id."""
    base, env = ui_server
    spec = tmp_path_factory.mktemp("spec") / "task.json"
    spec.write_text(json.dumps({
        "id": "ui-demo", "title": "UI demo",
        "script": "keruta-agent progress 40\necho building the report\nkeruta-agent progress 100\n"
                  'mkdir -p "$KERUTA_ARTIFACTS_DIR" && echo done > "$KERUTA_ARTIFACTS_DIR/report.txt"'}))
    done = subprocess.run([sys.executable, "-m", "keruta_prefect.cli", "run", "--task-file", str(spec)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = httpx.post(f"{base}/api/flow_runs/filter", json={"flow_runs": {"name": {"like_": ""}}, "limit": 10}).json()
    [run] = [r for r in runs if r["parameters"].get("task_spec", {}).get("id") == "ui-demo"]
    return str(run["id"])


@pytest.fixture(scope="module")
def page(ui_server: tuple[str, dict[str, str]]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                  "--no-first-run", "--disable-component-update", "--disable-sync"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1800})
        yield tab
        browser.close()


def block_document_id(base: str, slug: str, name: str) -> str:
    response = httpx.get(f"{base}/api/block_types/slug/{slug}/block_documents/name/{name}")
    response.raise_for_status()
    return str(response.json()["id"])


def test_the_settings_block_form_shows_every_admin_field_with_its_description(
        ui_server: tuple[str, dict[str, str]], finished_run: str, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base, _env = ui_server
    settings_id = block_document_id(base, "keruta-kubernetes-settings", "default")
    page.goto(f"{base}/blocks/block/{settings_id}/edit")
    # What the original admin screen edited, each with its description.
    for label, description in [
        ("Enabled", "Kubernetes integration on or off"),
        ("Config Path", "kubeconfig file"),
        ("In Cluster", "use the Pod's service account"),
        ("Credentials Block", "keruta.kubernetes.credentials-block"),
        ("Default Namespace", "keruta.kubernetes.default-namespace"),
        ("Default Image", "keruta.kubernetes.default-image"),
        ("Default Pvc Storage Size", "keruta.kubernetes.default-pvc-storage-size"),
        ("Default Pvc Access Mode", "keruta.kubernetes.default-pvc-access-mode"),
        ("Default Pvc Storage Class", "keruta.kubernetes.default-pvc-storage-class"),
    ]:
        # A field's label reads "Name (Optional)", or is a heading when the field may be empty.
        expect(page.get_by_text(re.compile(rf"^{label}( \(Optional\))?$")).first).to_be_visible(timeout=30_000)
        expect(page.get_by_text(description).first).to_be_visible()
    page.screenshot(path=str(SHOTS / "settings-block-edit.png"), full_page=True)

    # The API token is a secret: shown obfuscated, never in clear.
    api_id = block_document_id(base, "keruta-api", "default")
    page.goto(f"{base}/blocks/block/{api_id}")
    expect(page.get_by_text("Token", exact=True).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("********").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "api-block.png"), full_page=True)


def test_a_finished_flow_run_shows_the_summary_the_files_and_the_progress(
        ui_server: tuple[str, dict[str, str]], finished_run: str, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base, _env = ui_server
    page.goto(f"{base}/runs/flow-run/{finished_run}")
    expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("keruta task ui-demo COMPLETED").first).to_be_visible(timeout=30_000)  # the run log
    page.screenshot(path=str(SHOTS / "flow-run.png"), full_page=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    expect(page.get_by_text("keruta-ui-demo", exact=True).first).to_be_visible(timeout=30_000)  # the summary
    expect(page.get_by_text("keruta-ui-demo-files", exact=True).first).to_be_visible()  # the files table
    expect(page.get_by_text("keruta-ui-demo-progress", exact=True).first).to_be_visible()  # the progress
    page.screenshot(path=str(SHOTS / "flow-run-artifacts.png"), full_page=True)

    page.goto(f"{base}/artifacts/key/keruta-ui-demo")
    page.locator("a[href^='/artifacts/artifact/']").first.click()
    expect(page.get_by_text("keruta task ui-demo: COMPLETED").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("building the report").first).to_be_visible()  # the log tail
    page.screenshot(path=str(SHOTS / "summary-artifact.png"), full_page=True)

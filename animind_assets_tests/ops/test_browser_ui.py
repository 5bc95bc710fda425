"""The Dagster UI, driven in Debian's Chromium: lineage page, launchpad materialization, asset metadata.

Starts ``dagster dev`` (webserver + daemon + code server) on 127.0.0.1 with a free port, a temp
DAGSTER_HOME (the shipped ``.dagster_home/dagster.yaml``) and a temp ANIMIND_DATA_DIR, a small SQLite
source (the defect fixture + 200 synthetic anime), a settings file ``anime_prep: {limit: 150}``
(``ANIMIND_SETTINGS``) and the automation sensor every 5 s.
Then, in the browser:

1. the global lineage page shows the graph; filter it to the foundation group ``prep``;
2. "Materialize all" -> "Open launchpad": the launchpad shows ``limit: 150`` pre-filled from the
   settings file; launch with the in-process executor;
3. the run page shows Success;
4. the ``anime_prep`` asset page shows its metadata: row count 150 and the genre plot (a PNG embedded
   in markdown, rendered as an <img>); ``user_interactions`` shows its row count;
5. the Automation page lists AniMind's schedules and sensors;
6. 3 texts change in the SQLite source; the ``observe_sources`` job (launched once through the
   GraphQL API, as its hourly schedule would) sees the new fingerprint and the automation sensor
   launches one run (anime_prep + user_interactions + anime_prep's blocking check);
   it succeeds, evaluates the check and keeps the settings file's limit (150 rows); its run page is
   shown.

Screenshots, the server log and timings go to ``test-artifacts/browser/`` (git-ignored).
Needs Debian's ``chromium`` package (``apt-get install -y chromium``); never ``playwright install``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("ANIMIND_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SERVER_TIMEOUT_S = 420
RUN_TIMEOUT_S = 300
AUTOMATION_TIMEOUT_S = 240  # observe run + sensor interval (5 s)
SETTINGS_LIMIT = 150
LAUNCHPAD_CONFIG = """execution:
  config:
    in_process: {}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(base: str, query: str, variables: dict | None = None, timeout: float = 10.0) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{base}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


LOCATIONS_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
RUN_QUERY = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status
  stepStats { stepKey status } } } }"""


def _log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to `dagster dev` (it stops its webserver/daemon/code servers), then SIGKILL its group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="python playwright not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    from animind_assets_tests.conftest import add_synthetic_anime, write_sqlite

    tmp = tmp_path_factory.mktemp("ui")
    home, data = tmp / "dagster_home", tmp / "data"
    home.mkdir()
    data.mkdir()
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    source = write_sqlite(tmp / "catalog.sqlite")
    synthetic_ids = add_synthetic_anime(source, 200)
    settings = tmp / "animind.yaml"
    settings.write_text(f"# browser test settings\nanime_prep:\n  limit: {SETTINGS_LIMIT}\n")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ANIMIND_DATA_DIR": str(data),
        "ANIMIND_SOURCE": "sqlite",
        "ANIMIND_SQLITE_PATH": str(source),
        "ANIMIND_SETTINGS": str(settings),
        # the hourly observation would not fire during the test: the test launches the observe job itself
        # once after changing the source (as the schedule would); the automation sensor does the rest
        "ANIMIND_OBSERVE_SCHEDULE": "stopped",
        "ANIMIND_AUTOMATION_INTERVAL_S": "5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("ANIMIND_EXECUTOR", None)
    dagster_bin = Path(sys.executable).parent / "dagster"
    cmd = [str(dagster_bin)] if dagster_bin.exists() else [sys.executable, "-m", "dagster"]
    cmd += ["dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(ROOT / "workspace.yaml")]
    log_path = ARTIFACTS / "dagster_dev.log"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{_log_tail(log_path)}")
            try:
                entries = _graphql(base, LOCATIONS_QUERY)["data"]["workspaceOrError"]["locationEntries"]
                status = [(e["name"], e["loadStatus"], e["locationOrLoadError"]) for e in entries]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    errors = [e for e in entries if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"]
                    if errors:
                        pytest.fail(f"code location failed to load: {errors[0]['locationOrLoadError']['message'][:2000]}")
                    break
            except (OSError, KeyError, TypeError, ValueError):
                pass
            time.sleep(2)
        else:
            pytest.fail(f"dagster dev not ready after {SERVER_TIMEOUT_S}s (last status {status}):\n{_log_tail(log_path)}")
        timings["server_ready_s"] = time.perf_counter() - t0
        yield {"base": base, "log": log_path, "data": data, "timings": timings, "source": source, "ids": synthetic_ids}
    finally:
        _stop(proc)
        timings["total_s"] = time.perf_counter() - t0
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2))


def _wait_run(base: str, run_id: str, log_path: Path) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    run = {}
    while time.monotonic() < deadline:
        try:
            run = _graphql(base, RUN_QUERY, {"id": run_id}, timeout=60)["data"]["runOrError"]
        except OSError:  # a busy webserver (shared CI box): ask again
            time.sleep(2)
            continue
        if run.get("status") in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(2)
    pytest.fail(f"run {run_id} not finished after {RUN_TIMEOUT_S}s: {run}\n{_log_tail(log_path)}")


LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
AUTO_RUNS_QUERY = """query { runsOrError(filter: {tags: [{key: "dagster/auto_materialize", value: "true"}]}) {
  ... on Runs { results { runId status } } } }"""
LATEST_MATERIALIZATION = """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations(limit: 1) { runId metadataEntries { label ... on IntMetadataEntry { intValue } } } } } }"""


def _wait_automated_run(base: str, log_path: Path) -> str:
    """The id of the first run launched by the automation sensor (waits for the observation cron)."""
    deadline = time.monotonic() + AUTOMATION_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            runs = _graphql(base, AUTO_RUNS_QUERY, timeout=60)["data"]["runsOrError"]["results"]
        except OSError:
            time.sleep(3)
            continue
        if runs:
            assert len(runs) == 1, f"one automated run expected: {runs}"
            return runs[0]["runId"]
        time.sleep(3)
    pytest.fail(f"no automated run {AUTOMATION_TIMEOUT_S}s after the source change:\n{_log_tail(log_path)}")


@pytest.mark.slow
def test_lineage_launchpad_materialize_and_asset_metadata(dagster_ui):
    from playwright.sync_api import expect, sync_playwright

    base, log_path, timings = dagster_ui["base"], dagster_ui["log"], dagster_ui["timings"]
    expect.set_options(timeout=90_000)  # a shared CI box can take many seconds to render a page
    t0 = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(90_000)

            # 1. global lineage page, filtered to the foundation group
            page.goto(f"{base}/asset-groups", wait_until="domcontentloaded")
            expect(page).to_have_title("Global asset lineage", timeout=90_000)
            page.locator("div.CodeMirror").first.click()  # the asset selection input
            page.keyboard.type('group:"prep"')
            page.keyboard.press("Enter")
            expect(page.get_by_role("button", name="Materialize all")).to_be_visible()
            expect(page.get_by_text("anime_prep").first).to_be_visible()
            expect(page.get_by_text("user_interactions").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "01_lineage_prep.png"))

            # 2. launchpad with a tiny config
            page.locator("xpath=//button[normalize-space(.)='Materialize all']/following::button[1]").click()
            page.get_by_role("menuitem", name="Open launchpad").click()
            dialog = page.get_by_role("dialog")
            editor = dialog.locator(".CodeMirror").first
            editor.wait_for()
            expect(dialog.get_by_text("anime_source").first).to_be_visible()
            prefilled = editor.evaluate("el => el.CodeMirror.getValue()")
            assert f"limit: {SETTINGS_LIMIT}" in prefilled, f"settings file limit not pre-filled:\n{prefilled[:2000]}"
            page.screenshot(path=str(ARTIFACTS / "02_launchpad_prefilled.png"))
            editor.evaluate("(el, value) => el.CodeMirror.setValue(value)", LAUNCHPAD_CONFIG)
            expect(dialog.get_by_text("No errors")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "02_launchpad.png"))
            dialog.locator("button").filter(has_text="Materialize").last.click()

            # 3. the run page; wait for success
            page.wait_for_url("**/runs/*", timeout=90_000)
            run_id = page.url.rstrip("/").split("/runs/")[-1].split("?")[0]
            timings["launched_s"] = time.perf_counter() - t0
            run = _wait_run(base, run_id, log_path)
            timings["run_finished_s"] = time.perf_counter() - t0
            assert run["status"] == "SUCCESS", f"run {run_id}: {run}\n{_log_tail(log_path)}"
            steps = {s["stepKey"]: s["status"] for s in run["stepStats"]}
            assert steps.get("anime_prep") == "SUCCESS" and steps.get("user_interactions") == "SUCCESS", steps
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "03_run_success.png"))

            # 4. asset page: row count + the genre plot (PNG embedded in markdown metadata)
            page.goto(f"{base}/assets/anime_prep", wait_until="domcontentloaded")
            row_count = page.locator("tr", has_text="row_count").first
            expect(row_count.locator("td").last).to_have_text(str(SETTINGS_LIMIT), timeout=90_000)
            expect(page.get_by_text("Row count").first).to_be_visible()
            expect(page.locator("tr", has_text=f"sqlite:{dagster_ui['source']}").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "04_asset_anime_prep.png"), full_page=True)
            page.locator("tr", has_text="top_genres").first.get_by_text("[Show Markdown]").click()
            plot = page.get_by_role("dialog").locator("img[src^='data:image/png;base64,']").first
            expect(plot).to_be_visible()
            width, height, complete = plot.evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]")
            assert complete and width > 200 and height > 100, (width, height)
            page.wait_for_timeout(600)  # let the dialog finish fading in for the screenshot
            page.screenshot(path=str(ARTIFACTS / "05_asset_plot.png"))
            page.keyboard.press("Escape")

            page.goto(f"{base}/assets/user_interactions", wait_until="domcontentloaded")
            rows = page.locator("tr", has_text="row_count").first
            expect(rows).to_be_visible()
            value = rows.locator("td").last.inner_text().strip().replace(",", "")
            assert value.isdigit() and int(value) > 0, f"user_interactions row_count shown as {value!r}"
            expect(page.locator("tr", has_text="status_plot").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "06_asset_user_interactions.png"), full_page=True)

            # 5. AniMind's automation is registered
            page.goto(f"{base}/automation", wait_until="domcontentloaded")
            for name in ("observe_sources_schedule", "full_rebuild_weekly", "animind_automation", "animind_run_failure_alert"):
                expect(page.get_by_text(name).first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "07_automation.png"), full_page=True)

            # 6. a source change -> scheduled observation -> automated run with the check and the settings
            conn = sqlite3.connect(dagster_ui["source"])
            for anime_id in dagster_ui["ids"][:3]:
                conn.execute("UPDATE anime SET synopsis = synopsis || ' Remastered.' WHERE anime_id = ?", [anime_id])
            conn.commit()
            conn.close()
            t_change = time.perf_counter()
            launched = _graphql(base, LAUNCH_RUN, {"params": {
                "selector": {"repositoryLocationName": "animind", "repositoryName": "__repository__", "jobName": "observe_sources"},
                "runConfigData": {},
            }}, timeout=120)["data"]["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            observe_run = _wait_run(base, launched["run"]["runId"], log_path)
            assert observe_run["status"] == "SUCCESS", observe_run
            timings["observation_finished_after_change_s"] = time.perf_counter() - t_change
            auto_id = _wait_automated_run(base, log_path)
            timings["automated_run_launched_after_change_s"] = time.perf_counter() - t_change
            auto = _wait_run(base, auto_id, log_path)
            timings["automated_run_finished_after_change_s"] = time.perf_counter() - t_change
            assert auto["status"] == "SUCCESS", f"automated run {auto_id}: {auto}\n{_log_tail(log_path)}"
            steps = {s["stepKey"]: s["status"] for s in auto["stepStats"]}
            assert steps == {
                "anime_prep": "SUCCESS",
                "anime_prep_anime_prep_is_valid": "SUCCESS",
                "user_interactions": "SUCCESS",
            }, f"the automated run must materialize both assets and evaluate anime_prep's check: {steps}"
            latest = _graphql(base, LATEST_MATERIALIZATION, {"key": {"path": ["anime_prep"]}}, timeout=60)["data"]["assetOrError"]
            mat = latest["assetMaterializations"][0]
            assert mat["runId"] == auto_id
            rows = {e["label"]: e.get("intValue") for e in mat["metadataEntries"]}
            assert rows["dagster/row_count"] == SETTINGS_LIMIT, "the automated run must keep the settings file's limit"
            page.goto(f"{base}/runs/{auto_id}", wait_until="domcontentloaded")
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("anime_prep_is_valid").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "08_automated_run.png"))
        finally:
            browser.close()
    timings["browser_s"] = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    noisy = [line for line in log_text.splitlines() if "BetaWarning" in line or "PreviewWarning" in line]
    timings["beta_warning_lines"] = len(noisy)
    # was 90 lines in 50 minutes; what remains is at most Dagster's one `execution_type` notice logged while
    # the code server first builds the repository (not yet traced to where Dagster resets the filter)
    assert len(noisy) <= 1, f"known Dagster beta/preview warnings must be silenced in the server log: {noisy[:5]}"
    print(f"browser UI test timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")

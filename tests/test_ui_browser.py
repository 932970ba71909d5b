"""End to end through the Dagster UI: `dagster dev` on loopback, headless Chromium, the global asset
graph shows every stage, "Materialize all" (an asset backfill: rollout_shards is partitioned) runs
the smoke graph to SUCCESS, screenshots saved.

Skipped when /usr/bin/chromium or Playwright is missing, unless VAS_REQUIRE_BROWSER=1 (CI), where a
missing browser is a failure. Screenshots: VAS_UI_SCREENSHOT (default data/ui/ui_e2e.png) is the
page of the finished backfill; ui_asset_graph.png beside it is the graph before launching, and
ui_incoming_check.png the imported_preferences checks after the sensor took a good and a bad file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from models.environment import read_env

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# The machine has no network: never let Chromium phone home, and no GPU to use.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
SERVER_START_S = 120
RUN_TIMEOUT_S = 600
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
# Asset nodes on the graph are CSS-module classes (AssetNode_assetName__<hash>); the prefix is what
# is stable across builds. Group labels use other classes, so a group named like an asset
# ("evaluation", "rollouts") does not count as that asset's node.
ASSET_NODE_NAME = '[class*="AssetNode_assetName"]'


# ---------------------------------------------------------------- prerequisites


def _require_browser() -> None:
    """Skip without a browser, or fail when CI said one must be there (VAS_REQUIRE_BROWSER=1)."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if not missing:
        return
    reason = "UI browser test needs " + " and ".join(missing)
    if read_env().require_browser:
        pytest.fail(reason + "; VAS_REQUIRE_BROWSER=1 makes that an error", pytrace=False)
    pytest.skip(reason)


def _expected_asset_keys() -> list[str]:
    # From the Definitions `dagster dev` loads, so a newly added asset is expected on the graph too.
    from orchestration.definitions import defs

    return sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())


# ---------------------------------------------------------------- dagster dev


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class DagsterUI:
    """A `dagster dev` process group on a free loopback port with its own instance and data folder."""

    def __init__(self, tmp: Path):
        self.home = tmp / "dagster_home"
        self.data_dir = tmp / "data"
        self.log_path = tmp / "dagster_dev.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "DVC_NO_ANALYTICS": "1",
            "GX_ANALYTICS_ENABLED": "False",
            "VAS_PROFILE": "smoke",
            # A fresh data folder: the run must never read or overwrite the repo's data/.
            "VAS_DATA_DIR": str(self.data_dir),
            "VAS_DEVICE": "cpu",
            # Files the test drops are complete at once: the sensor need not wait for them.
            "VAS_INCOMING_SETTLE_SECONDS": "0",
            # Tiny models on 2 cores: one thread per step process avoids OpenMP threads spinning
            # against each other across the multiprocess executor's workers.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        })
        return env

    def start(self) -> None:
        self.home.mkdir(parents=True)
        self.data_dir.mkdir(parents=True)
        # Telemetry off and the pools (one GPU user, one DuckDB writer), as `make ui` has them.
        shutil.copy(ROOT / "orchestration" / "dagster.yaml", self.home / "dagster.yaml")
        dagster = ROOT / ".venv" / "bin" / "dagster"
        if not dagster.exists():  # a venv elsewhere: the dagster next to this interpreter
            dagster = Path(shutil.which("dagster") or "dagster")
        with open(self.log_path, "wb") as log:
            # Own session = own process group, so teardown reaches the webserver, daemon, code
            # server and run workers dagster dev spawns, not just the parent.
            self.proc = subprocess.Popen(
                [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev did not answer {self.url}/server_info within {timeout:.0f} s")

    def stop(self) -> None:
        """TERM the whole group, then KILL it: dagster dev can sit in its shutdown for a long
        time, and everything it wrote lives in the tmp folder, so nothing needs a clean exit."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # session leader: its pid is the group id
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        # The leader may be gone while workers of the group linger; KILL whatever is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            payload = json.load(resp)
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def run_ids(self) -> set[str]:
        data = self.graphql("{ runsOrError { ... on Runs { results { runId } } } }")
        return {run["runId"] for run in data["runsOrError"]["results"]}

    def runs(self) -> list[dict]:
        data = self.graphql("{ runsOrError { ... on Runs { results { runId jobName status "
                            "tags { key value } } } } }")
        return data["runsOrError"]["results"]

    def backfill_ids(self) -> set[str]:
        data = self.graphql("{ partitionBackfillsOrError { ... on PartitionBackfills { results { id } } } }")
        return {b["id"] for b in data["partitionBackfillsOrError"]["results"]}

    def backfill_status(self, backfill_id: str) -> str:
        data = self.graphql("query ($id: String!) { partitionBackfillOrError(backfillId: $id) { "
                            "... on PartitionBackfill { status } } }", {"id": backfill_id})
        return data["partitionBackfillOrError"]["status"]

    def check_executions(self, asset: str, check: str) -> list[dict]:
        data = self.graphql(
            """query ($asset: AssetKeyInput!, $check: String!) {
                 assetCheckExecutions(assetKey: $asset, checkName: $check, limit: 20) {
                   runId status evaluation { success description } } }""",
            {"asset": {"path": [asset]}, "check": check})
        return data["assetCheckExecutions"]

    def run(self, run_id: str) -> dict:
        data = self.graphql(
            """query ($runId: ID!) { runOrError(runId: $runId) { __typename
                 ... on Run { status assetMaterializations { assetKey { path } } } } }""",
            {"runId": run_id})
        return data["runOrError"]


@pytest.fixture
def dagster_ui(tmp_path):
    _require_browser()  # before spending a minute on the server
    ui = DagsterUI(tmp_path)
    try:
        ui.start()
        ui.wait_ready()
    except Exception as exc:
        ui.stop()
        pytest.fail(f"dagster dev did not come up: {exc}\n--- {ui.log_path} (tail) ---\n"
                    f"{_log_tail(ui.log_path)}", pytrace=False)
    try:
        yield ui
    finally:
        ui.stop()


@pytest.fixture
def page(dagster_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # The Debian Chromium, never a downloaded one: the network is closed.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            # The "Join the Dagster community" dialog on localhost covers the graph; this is the
            # key its Skip button sets.
            context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


# ---------------------------------------------------------------- UI steps


def _screenshot_paths() -> tuple[Path, Path]:
    final = Path(read_env().ui_screenshot or ROOT / "data" / "ui" / "ui_e2e.png")
    return final, final.with_name("ui_asset_graph.png")


def _save_screenshot(page, dest: Path) -> None:
    """Write atomically, so a reader never sees half a PNG (the report or a CI artifact upload)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(page.screenshot(type="png", full_page=True))
    os.replace(tmp, dest)


def _dismiss_community_dialog(page) -> None:
    # Belt and braces for the init script: a later UI may rename the storage key.
    skip = page.get_by_role("button", name="Skip", exact=True)
    if skip.is_visible():
        skip.click()


def _asset_names_on_graph(page) -> list[str]:
    return [text.strip() for text in page.locator(ASSET_NODE_NAME).all_inner_texts()]


def _shows(label: str, name: str) -> bool:
    """Whether a node label is this asset: zoomed out, the graph middle-truncates names longer than
    18 characters ("impor…_preferences"), and the full name is only in a hover tooltip."""
    if label == name:
        return True
    head, ellipsis, tail = label.partition("\u2026")
    return bool(ellipsis) and len(name) > len(label) - 1 and name.startswith(head) and name.endswith(tail)


def _missing_from_graph(labels: list[str], expected: list[str]) -> list[str]:
    """Expected assets with no node of their own: exact labels first, then truncated ones, each
    label used once, so two assets cannot both be vouched for by one node."""
    left = list(labels)
    missing = []
    for name in sorted(expected, key=lambda n: n not in left):  # exact matches claim labels first
        label = next((lab for lab in left if _shows(lab, name)), None)
        if label is None:
            missing.append(name)
        else:
            left.remove(label)
    return missing


def _open_asset_graph(page, ui: DagsterUI, expected: list[str]) -> None:
    """The global lineage graph (Lineage in the nav, /asset-groups) with every group expanded.

    Groups start collapsed into one box each; Alt+E is the graph's "Expand all groups" shortcut
    (it toggles, and a fresh browser context starts with none expanded)."""
    page.goto(f"{ui.url}/asset-groups")
    # The code server imports torch and transformers before the graph can load: allow for it.
    page.get_by_role("button", name="Materialize all").wait_for(timeout=SERVER_START_S * 1000)
    page.wait_for_timeout(1000)  # the NUX dialog, if any, opens a moment after the page
    _dismiss_community_dialog(page)
    if _missing_from_graph(_asset_names_on_graph(page), expected):
        page.keyboard.press("Alt+e")
    deadline = time.monotonic() + 60
    while missing := _missing_from_graph(shown := _asset_names_on_graph(page), expected):
        if time.monotonic() > deadline:
            raise AssertionError(f"asset graph lacks {missing}; its nodes read {sorted(shown)}")
        page.wait_for_timeout(500)


def _materialize_all(page, ui: DagsterUI) -> str:
    """Click "Materialize all", choose every partition of rollout_shards, launch; return the id of
    the backfill it launched.

    The button takes asset keys straight from the graph, never a selection string, so Dagster's
    Python selection parser (broken here by hydra-core's antlr4 4.9 pin) is not involved.
    rollout_shards is partitioned, so the partition dialog opens and the click launches an asset
    backfill: the daemon runs rollout_shards' shards in one run (its single-run backfill policy)
    and the unpartitioned assets in runs of their own. A launchpad, if a future asset needs one,
    is launched as it opens."""
    before = ui.backfill_ids()
    page.get_by_role("button", name="Materialize all").click()
    deadline, chose_all = time.monotonic() + 60, False
    while time.monotonic() < deadline:
        new = ui.backfill_ids() - before
        if new:
            assert len(new) == 1, f"one click launched several backfills: {new}"
            return new.pop()
        dialog = page.get_by_role("dialog")
        every = dialog.get_by_role("button", name="All", exact=True)
        if not chose_all and every.count():
            every.first.click()
            chose_all = True
            page.wait_for_timeout(500)
        for name in ("Launch backfill", "Launch run"):
            launch = dialog.get_by_role("button", name=name)
            if launch.count() and launch.first.is_enabled():
                launch.first.click()
                break
        page.wait_for_timeout(1000)
    raise AssertionError("no backfill appeared within 60 s of clicking Materialize all")


def _wait_for_backfill(ui: DagsterUI, backfill_id: str, timeout: float = RUN_TIMEOUT_S) -> list[dict]:
    """The backfill's runs, once it is done (every run of it finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ui.backfill_status(backfill_id)
        runs = [r for r in ui.runs() if {"key": "dagster/backfill", "value": backfill_id} in r["tags"]]
        if status not in ("REQUESTED", "CANCELING", "FAILING") and all(r["status"] in TERMINAL for r in runs):
            return runs
        time.sleep(5)
    raise AssertionError(f"backfill {backfill_id} not finished after {timeout:.0f} s: {ui.backfill_status(backfill_id)}")


def _wait_for_run(ui: DagsterUI, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = ui.run(run_id)
        if run.get("status") in TERMINAL:
            return run
        time.sleep(5)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s: {ui.run(run_id).get('status')}")


def _incoming_files_through_the_daemon(page, ui: DagsterUI, screenshot: Path) -> None:
    """The new-data sensor as the daemon runs it: a good and a bad file dropped into
    data/incoming/ give one retrain (of the good one) and a failed check naming the bad one."""
    incoming = ui.data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / "good.csv").write_text(
        "prompt,chosen,rejected,attribute\n"
        "The blender,works great and I love it.,broke after a day and is awful.,positivity\n"
        "This lamp,is bright and sturdy and lovely.,flickers and feels cheap.,positivity\n")
    (incoming / "bad.csv").write_text("prompt,chosen,rejected,attribute\nThe kettle,,leaks.,positivity\n")
    deadline = time.monotonic() + 120  # the sensor ticks every 30 s
    while not (retrains := [r for r in ui.runs() if r["jobName"] == "incoming_retrain"]):
        assert time.monotonic() < deadline, "the sensor launched no incoming_retrain within 120 s"
        time.sleep(3)
    assert len(retrains) == 1, f"expected one retrain (the good file), got {retrains}"
    tags = {t["key"]: t["value"] for t in retrains[0]["tags"]}
    assert tags["vas/incoming"] == "good.csv" and tags["dagster/sensor_name"] == "incoming_preferences_sensor"
    run = _wait_for_run(ui, retrains[0]["runId"])
    assert run["status"] == "SUCCESS", f"incoming retrain ended {run['status']}"
    executions = ui.check_executions("imported_preferences", "imported_preferences_suite")
    rejected = [e for e in executions if e["status"] == "FAILED"]
    assert len(rejected) == 1 and "bad.csv" in rejected[0]["evaluation"]["description"], executions
    assert any(e["status"] == "SUCCEEDED" and e["runId"] == retrains[0]["runId"] for e in executions)
    page.goto(f"{ui.url}/assets/imported_preferences?view=checks")
    page.get_by_text("imported_preferences_suite").first.wait_for()
    # The history lists the sensor's rejection of bad.csv under the retrain's passing check.
    page.get_by_text("Execution history", exact=True).first.click()
    page.wait_for_timeout(2000)
    _save_screenshot(page, screenshot)


# ---------------------------------------------------------------- the test


def test_materialize_all_from_the_ui(dagster_ui, page, tmp_path):
    expected = _expected_asset_keys()
    final_png, graph_png = _screenshot_paths()
    try:
        _open_asset_graph(page, dagster_ui, expected)
        _save_screenshot(page, graph_png)

        backfill_id = _materialize_all(page, dagster_ui)
        page.goto(f"{dagster_ui.url}/runs/b/{backfill_id}")  # watch it live, as a user would
        runs = _wait_for_backfill(dagster_ui, backfill_id)
        assert runs and all(r["status"] == "SUCCESS" for r in runs), [(r["runId"], r["status"]) for r in runs]
        assert dagster_ui.backfill_status(backfill_id) in ("COMPLETED", "COMPLETED_SUCCESS")
        materialized = {"/".join(m["assetKey"]["path"]) for r in runs
                        for m in dagster_ui.run(r["runId"])["assetMaterializations"]}
        assert materialized == set(expected), f"materialized {sorted(materialized)}, expected {expected}"
        # Every shard in one run (rollout_shards' single-run backfill policy).
        shard_runs = [r for r in runs if any(m["assetKey"]["path"] == ["rollout_shards"]
                                             for m in dagster_ui.run(r["runId"])["assetMaterializations"])]
        assert len(shard_runs) == 1, shard_runs

        page.goto(f"{dagster_ui.url}/runs/b/{backfill_id}")
        page.get_by_text("rollout_shards").first.wait_for()
        page.wait_for_timeout(2000)
        _save_screenshot(page, final_png)

        _incoming_files_through_the_daemon(page, dagster_ui, final_png.with_name("ui_incoming_check.png"))
    except BaseException:
        # What the browser and the server saw, for a failure in CI where neither is at hand.
        with contextlib.suppress(Exception):
            _save_screenshot(page, tmp_path / "failure.png")
            print(f"\nbrowser at {page.url}; screenshot {tmp_path / 'failure.png'}")
        print(f"\n--- {dagster_ui.log_path} (tail) ---\n{_log_tail(dagster_ui.log_path)}")
        raise

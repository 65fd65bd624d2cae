"""The results UIs in a real headless browser: `make ui` (MLflow) and `make dashboard` (optuna-dashboard).

A throw-away MLflow store and Optuna storage (two tiny training runs and a three-trial sweep, built
through the public entry points) are served by the Makefile targets the README points to, and
Debian's Chromium, driven by Playwright, checks what a person would look at: the runs with their
tags, a run's per-epoch chart, a sweep's parent run with its trials nested under it, and the study
with its trials in optuna-dashboard. Screenshots of every check go to the test's tmp folder and to
$SCPL_UI_SHOTS when it is set.

Needs /usr/bin/chromium (`apt-get install chromium`; never `playwright install`): marked `needs_browser`,
so without it the module is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from scpl_kit.engines.launch import free_port
from scpl_kit.tracking import ui_link

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.needs_browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDY = "tiny"
N_TRIALS = 3
EPOCHS = 2
METHODS = ("bp", "scpl")
GRID_PARTS = {"bp": "vision", "scpl": "local_k"}  # tracking.group, as the DVC grid sets it per part
SHOTS_COPY = os.environ.get("SCPL_UI_SHOTS")  # also copy the screenshots here, to look at them after the run
TIMEOUT_MS = 30_000  # a first page load compiles MLflow's large JS bundle: seconds on 2 cores

try:  # imported here so that collecting the module needs no playwright; the marker skips its tests without one
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    # The context's default timeout covers actions only; `expect` keeps its own (5 s), which a run
    # page loading on a busy 2-core CI host has overrun.
    expect.set_options(timeout=TIMEOUT_MS)
except ImportError:
    Browser = Page = expect = sync_playwright = None  # type: ignore[assignment,misc]


# --- the store: two training runs and one sweep, through the public entry points ----------------


@contextlib.contextmanager
def restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Session, not module (as tests/test_pipeline.py's repo): other modules' tests may run between this
# module's on its worker, and a module fixture would be made again after them.
@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, processed_dir: Path) -> dict:
    """An MLflow store (sqlite) with runs bp and scpl, and an Optuna study `tiny` whose MLflow parent
    run has one nested run per trial. Built once for the module, all of it in a tmp folder."""
    from mlflow import MlflowClient

    from scpl_kit.config import compose_config
    from scpl_kit.sweep import main as sweep_main
    from scpl_kit.train import run

    tmp = tmp_path_factory.mktemp("ui_store")
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    optuna_uri = f"sqlite:///{tmp / 'optuna.db'}"
    # One torch thread: as fast on these tiny models, and robust to sharing the two cores with other
    # tests (with torch's default threads, a 20 s sweep took 3 minutes while another test ran).
    # The setting is process-wide: put the old value back for the tests that come after.
    common = ["profile=smoke", f"data.processed_dir={processed_dir}", "trainer.threads=1", f"tracking.uri={mlflow_uri}"]
    with pytest.MonkeyPatch.context() as mp, restore_torch_threads():
        mp.chdir(tmp)  # whatever MLflow writes relative to the working directory lands here
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for method in METHODS:  # as the smoke_config fixture composes them, with tracking on
            cfg = compose_config([
                *common, f"out_dir={tmp / 'out' / method}", f"trainer.checkpoint_dir={tmp / 'checkpoints' / method}",
                "trainer.progress=false", "tracking.enabled=true", f"method={method}", f"trainer.epochs={EPOCHS}",
                f"tracking.group={GRID_PARTS[method]}",
            ])
            run(cfg)
        experiment = cfg.tracking.experiment
        # The sweep as tests/test_sweep.py's sweep_env sets it up: a copy of conf/ with a `tiny` study.
        conf = tmp / "conf"
        shutil.copytree(REPO / "conf", conf)
        study = yaml.safe_load((conf / "sweep" / "scpl_tau_lr.yaml").read_text())
        study.update(
            study_name=STUDY, n_trials=N_TRIALS, search_only=[f"trainer.epochs={EPOCHS}"], heartbeat_s=1,
            space={"method.temperature": {"type": "float", "low": 0.05, "high": 0.5, "log": True}, "optimizer.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}},
            storage=optuna_uri, output_dir=str(tmp / "trials"), export_dir=str(conf / "method"), pruner={"name": "none"},
        )
        (conf / "sweep" / f"{STUDY}.yaml").write_text(yaml.safe_dump(study))
        mp.setenv("SCPL_CONF_DIR", str(conf))
        assert sweep_main([f"sweep={STUDY}", *common]) == 0

    client = MlflowClient(mlflow_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    training = {m: r for m in METHODS for r in runs if r.data.tags.get("method") == m and "mlflow.parentRunId" not in r.data.tags}
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert set(training) == set(METHODS) and len(parents) == 1, "the store does not hold one run per method and one sweep parent run"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) >= 2, "the sweep's parent run has fewer than two nested trial runs"
    import optuna

    (study_name,) = optuna.get_all_study_names(optuna_uri)  # the sweep names it (say, `tiny-<profile>-<hash>`)
    assert study_name.startswith(STUDY)
    trials = optuna.load_study(study_name=study_name, storage=optuna_uri).trials
    return {
        "mlflow": mlflow_uri, "optuna": optuna_uri, "experiment_id": experiment_id, "study": study_name, "processed_dir": processed_dir,
        "training": training, "parent": parents[0], "children": children, "trials": trials,
    }


# --- the servers, started by the Makefile ---------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to make and everything it started (its own process group), SIGKILL to what is left."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.wait(timeout=5)


@contextlib.contextmanager
def make_server(target: str, variables: list[str], url: str, ready_path: str, log: Path) -> Iterator[str]:
    """`make -s <target> VAR=...` as the README says, until `url + ready_path` answers 200; killed afterwards.
    `-o .venv/.installed`: the test already runs inside the environment, so `setup` must not
    reinstall it even if pyproject.toml changed since (under `make test` it was just brought up to date)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", target, *variables],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    ready_url = url + ready_path
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`make {target}` exited with {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`make {target}`: {ready_url} did not answer within 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)  # polling a server that is starting, not waiting for the UI
        yield url
    finally:
        stop_group(proc)


def served(target: str, variables: dict[str, str], ready_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make <target> VAR=...` on a free port, until it answers; stopped when the module is done."""
    port = free_port()
    settings = [f"{key}={value}" for key, value in variables.items()] + [f"{PORT_VARIABLES[target]}={port}"]
    log = tmp_path_factory.mktemp("ui_logs") / f"{target}.log"
    with make_server(target, settings, f"http://127.0.0.1:{port}", ready_path, log) as url:
        yield url


PORT_VARIABLES = {"ui": "PORT", "dashboard": "DASHBOARD_PORT"}  # as the Makefile names them


@pytest.fixture(scope="session")
def mlflow_ui(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served("ui", {"MLFLOW_STORE": store["mlflow"]}, "/health", tmp_path_factory)


@pytest.fixture(scope="session")
def dashboard(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # optuna-dashboard has no /health; its JSON API answers once the storage is open.
    yield from served("dashboard", {"OPTUNA_STORE": store["optuna"]}, "/api/studies", tmp_path_factory)


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Debian's Chromium, never a downloaded one: `playwright install` cannot run here.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@contextlib.contextmanager
def screenshot(page: Page, tmp_path: Path, name: str) -> Iterator[None]:
    """A screenshot of the page once the check is done, or at the moment it failed."""
    try:
        yield
    finally:
        folder = tmp_path / "screenshots"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=path, full_page=True)
            if SHOTS_COPY:
                Path(SHOTS_COPY).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, Path(SHOTS_COPY) / path.name)


def close_assistant(page: Page) -> None:
    """MLflow 3.17 opens an assistant panel on the right that takes a third of the width."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.click()
        expect(close).to_have_count(0)


def runs_table(page: Page, url: str, experiment_id: str) -> None:
    """The classic runs table (MLflow 3.17 otherwise opens an experiment in its GenAI views)."""
    page.goto(ui_link(url, experiment_id))  # the link the README gives
    expect(page.locator(".ag-root")).to_be_visible()
    expect(page.locator(".ag-row").first).to_be_visible()
    close_assistant(page)


def row(page: Page, run_id: str):
    """A run's row in the table: ag-grid keys rows by run id, once in the pinned-left and once in the centre part."""
    return page.locator(f'.ag-row[row-id="{run_id}"]')


# --- MLflow ---------------------------------------------------------------------------------------


def test_runs_list_shows_the_training_runs_and_their_method_tag(page: Page, store: dict, mlflow_ui: str, tmp_path: Path) -> None:
    with screenshot(page, tmp_path, "mlflow_runs_with_method_tag"):
        runs_table(page, mlflow_ui, store["experiment_id"])
        for method, run in store["training"].items():
            expect(row(page, run.info.run_id).get_by_role("link", name=run.info.run_name, exact=True)).to_be_visible()
        # Tags are not columns by default: add the `method` tag from the column selector.
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill("method")
        tree = page.get_by_test_id("column-selector-tree")
        tree.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(r"^method$")).locator(".du-bois-light-tree-checkbox").click()
        page.keyboard.press("Escape")
        column = 'tags.`method`'
        expect(page.locator(f'.ag-header-cell[col-id="{column}"]')).to_have_text("method")
        for method, run in store["training"].items():
            cell = row(page, run.info.run_id).locator(f'[col-id="{column}"]')
            cell.scroll_into_view_if_needed()
            expect(cell).to_be_visible()
            expect(cell).to_have_text(method)


def test_runs_say_what_differs_show_their_dataset_and_group_by_grid_part(page: Page, store: dict, mlflow_ui: str, tmp_path: Path) -> None:
    """A run's name says method config, K modules, engine and seed; its prepared data is its MLflow
    dataset input (name and digest in the Dataset column); Group by → grid_part gathers the grid's parts."""
    names = {method: run.info.run_name for method, run in store["training"].items()}
    assert names == {"bp": "mnist5k-vgg-bp-k1-sequential-s0", "scpl": "mnist5k-vgg-scpl-k4-sequential-s0"}  # BP: one unit; smoke VGG8: 4 blocks
    digests = {method: [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] for method, run in store["training"].items()}
    meta = json.loads((store["processed_dir"] / "mnist5k" / "meta.json").read_text())
    digest = hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()[:16]  # the prepared files' checksums
    assert digests == {"bp": [("mnist5k", digest)], "scpl": [("mnist5k", digest)]}
    with screenshot(page, tmp_path, "mlflow_runs_grouped_by_grid_part"):
        runs_table(page, mlflow_ui, store["experiment_id"])
        for run in store["training"].values():
            expect(row(page, run.info.run_id).filter(has_text=f"mnist5k ({digest})")).to_have_count(1)
        page.get_by_role("button", name="Group by").click()
        page.get_by_role("menuitemcheckbox", name="grid_part", exact=True).click()
        page.keyboard.press("Escape")
        for method, part in GRID_PARTS.items():
            expect(page.locator(f'.ag-row[row-id="tag.grid_part.{part}"]').filter(has_text=f"Group: {part}")).to_have_count(1)
            # A grouped run's row id is the path to it: tag.grid_part.<group>.<run id>.
            expect(page.locator(f'.ag-row[row-id="tag.grid_part.{part}.{store["training"][method].info.run_id}"]').first).to_be_visible()


@pytest.mark.parametrize("method", METHODS)
def test_a_run_page_draws_the_per_epoch_validation_accuracy(page: Page, store: dict, mlflow_ui: str, tmp_path: Path, method: str) -> None:
    run = store["training"][method]
    with screenshot(page, tmp_path, f"mlflow_run_{method}_val_acc_chart"):
        page.goto(ui_link(mlflow_ui, store["experiment_id"], run.info.run_id))  # the link training prints
        expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()
        close_assistant(page)
        page.get_by_role("tab", name="Model metrics").click()
        # Charts are drawn when scrolled into view; filter down to the validation accuracy.
        page.get_by_placeholder("Search metric charts").fill("val_acc")
        card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=page.get_by_text("val_acc", exact=True))
        expect(card).to_have_count(1)
        expect(card.locator(".js-plotly-plot")).to_be_visible()
        expect(card.get_by_text(f"{run.info.run_name} (val_acc)")).to_be_visible()  # the legend
        # One marker per epoch, joined by a line: the per-epoch history, not just the final value.
        expect(card.locator(".scatterlayer .trace path.point")).to_have_count(EPOCHS)
        expect(card.locator(".scatterlayer .trace path.js-line").first).to_have_attribute("d", re.compile(r"^M[\d.,-]+L"))


def test_the_sweep_run_expands_to_its_nested_trial_runs(page: Page, store: dict, mlflow_ui: str, tmp_path: Path) -> None:
    parent, children = store["parent"], store["children"]
    with screenshot(page, tmp_path, "mlflow_sweep_parent_expanded"):
        runs_table(page, mlflow_ui, store["experiment_id"])
        parent_row = row(page, parent.info.run_id)
        expect(parent_row.get_by_role("link", name=parent.info.run_name, exact=True)).to_be_visible()
        # Trials are nested: folded under their parent, not rows of their own.
        for child in children:
            expect(row(page, child.info.run_id)).to_have_count(0)
        parent_row.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').click()
        for child in children:
            expect(row(page, child.info.run_id).get_by_role("link", name=child.info.run_name, exact=True)).to_be_visible()
        # ... and shown right below it.
        indices = {int(r.get_attribute("row-index")) for r in page.locator(".ag-pinned-left-cols-container .ag-row").all() if r.get_attribute("row-id") in {c.info.run_id for c in children}}
        start = int(page.locator(f'.ag-pinned-left-cols-container .ag-row[row-id="{parent.info.run_id}"]').get_attribute("row-index"))
        assert indices == set(range(start + 1, start + 1 + len(children)))


# --- optuna-dashboard -----------------------------------------------------------------------------


def test_the_dashboard_lists_the_study_and_shows_its_trials(page: Page, store: dict, dashboard: str, tmp_path: Path) -> None:
    trials = store["trials"]
    with screenshot(page, tmp_path, "dashboard_study_list"):
        page.goto(f"{dashboard}/dashboard")
        study_link = page.get_by_role("link", name=re.compile(rf"\b{re.escape(store['study'])}\b"))
        expect(study_link).to_be_visible()
    study_link.click()
    with screenshot(page, tmp_path, "dashboard_study_history"):
        expect(page.get_by_text(re.compile(rf"^{re.escape(store['study'])} \(id=\d+\)$"))).to_be_visible()
        history = page.locator(".MuiCard-root").filter(has=page.get_by_role("heading", name="History", exact=True))
        expect(history.locator(".js-plotly-plot")).to_be_visible()
        complete = [t for t in trials if t.value is not None]
        expect(history.locator(".scatterlayer .trace path.point")).to_have_count(len(complete))
        intermediate = page.locator(".MuiCard-root").filter(has=page.get_by_role("heading", name="Intermediate values", exact=True))
        for trial in trials:  # every trial reported validation accuracy per epoch
            expect(intermediate.get_by_text(f"trial #{trial.number}", exact=True)).to_be_visible()
    with screenshot(page, tmp_path, "dashboard_trials_list"):
        page.get_by_role("link", name="Trials (List)").click()
        expect(page.get_by_text(f"{len(trials)} Trials", exact=True)).to_be_visible()
        for trial in trials:
            expect(page.get_by_text(f"Trial {trial.number}", exact=True)).to_be_visible()

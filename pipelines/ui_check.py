"""`make ui-check`: open the Prefect and MLflow UIs in headless Chromium, check what they show, save screenshots.

1. Prefect: uses $PREFECT_API_URL when it answers (e.g. `make serve` is running), else starts a local server on
   127.0.0.1 and serves the deployments for the check. Loads the `retrain` deployment page, checks that it shows the
   deployment name, its cron schedule and its upcoming scheduled runs; saves docs/prefect_deployment.png.
2. MLflow: starts `mlflow ui` on 127.0.0.1 over the project's tracking store, finds the latest ablation parent run
   (`groupvit ablate`), loads the compare view of its child runs ranked by `miou_test`, checks that every child's
   name and the metric are on the page; saves docs/mlflow_ablation.png.

Chromium is Debian's package (`apt-get install chromium`); browsers cannot be downloaded here.

Every server and browser it starts is a `groupvit.procs.TiedProcess`: it is stopped on exit, Ctrl-C, SIGTERM and
SIGHUP, and dies with this process even when that is killed with SIGKILL.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from groupvit.atomic import atomic_write
from groupvit.config import load_section
from groupvit.procs import TiedProcess
from pipelines.config import AblationConfig, OrchestrationConfig
from pipelines.serve import api_healthy, start_local_server, stop
from pipelines.tracking import TrackingConfig, resolve_uri
from pipelines.workspace import tool_env


class CheckFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise CheckFailed("no chromium found: `sudo apt-get update && sudo apt-get install -y chromium` (make ui-check "
                      "does this for you)")


def run_tied(cmd: list[str], timeout: float, check: bool = False) -> bytes:
    """Run `cmd` as a `TiedProcess` (its whole tree dies with this process); return its stdout.

    Raises:
        subprocess.TimeoutExpired: it ran for more than `timeout` seconds (the tree is killed).
        subprocess.CalledProcessError: `check` and it exited non-zero.
    """
    with tempfile.TemporaryFile() as out:
        with TiedProcess(cmd, stdout=out, stderr=subprocess.DEVNULL) as proc:  # __exit__ kills it on an error
            returncode = proc.wait(timeout)
        if check and returncode != 0:
            raise subprocess.CalledProcessError(returncode, cmd)
        out.seek(0)
        return out.read()


def browse(url: str, screenshot: Path | None = None, wait_ms: int = 15000, size: str = "1440,1000") -> str:
    """Render `url` in headless Chromium; return the DOM after `wait_ms` of (virtual) time, optionally screenshot."""
    with tempfile.TemporaryDirectory(prefix="groupvit-chromium-") as profile:
        base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                f"--virtual-time-budget={wait_ms}"]
        dom = run_tied([*base, "--dump-dom", url], timeout=180).decode(errors="replace")
        if screenshot is not None:
            shot = Path(profile) / "screenshot.png"  # Chromium picks the image format by the suffix
            run_tied([*base, f"--screenshot={shot}", url], timeout=180, check=True)
            atomic_write(screenshot, shot.read_bytes())
    return dom


COMPARE_AXES = {"parameters": ["changed"], "metrics": ["miou_test", "group_oracle"]}  # the parallel-coordinates plot


def compare_view(url: str, screenshot: Path, timeout_ms: int = 120_000) -> str:
    """Open MLflow's compare view `url` in headless Chromium (Playwright), plot the variants against held-out mIoU
    and the group oracle (MLflow preselects a few alphabetical metrics, `loss` among them), save `screenshot`;
    return the page's HTML.

    The selects are MLflow's design-system widgets: their visible options are `*-select-item-option` elements with the
    value as title (the ARIA options are hidden copies).
    """
    from playwright.sync_api import sync_playwright

    from pipelines.demo_browser import chromium_path

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1100}).new_page()
            page.goto(url, timeout=timeout_ms)
            page.get_by_text("Parallel Coordinates Plot").wait_for(timeout=timeout_ms)
            page.wait_for_timeout(2000)  # the plot's first render, which the selections below replace
            close = page.get_by_role("button", name="Close")  # the MLflow Assistant side panel, empty here
            if close.count():
                close.first.click()
            page.get_by_role("button", name="Clear All").click()
            boxes = page.locator("input[role=combobox]")
            for box, values in enumerate(COMPARE_AXES.values()):
                for value in values:
                    boxes.nth(box).click()
                    boxes.nth(box).fill(value)
                    page.locator(f'[class*=select-item-option][title="{value}"]').click(timeout=timeout_ms)
            page.keyboard.press("Escape")
            page.mouse.wheel(0, -10_000)  # back to the top: the plot, then the runs in their ranked order
            page.wait_for_timeout(1500)
            with tempfile.TemporaryDirectory(prefix="groupvit-shot-") as tmp:
                shot = Path(tmp) / "shot.png"
                page.screenshot(path=str(shot))
                atomic_write(screenshot, shot.read_bytes())
            return page.content()
        finally:
            browser.close()


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise CheckFailed(f"timed out after {timeout:g} s waiting for {what}")


def check_prefect(params: Path, out: Path, port: int = 4200) -> str:
    cfg = load_section(OrchestrationConfig, params, "prefect", required=False)
    server = serve = None
    running = [url for url in (os.environ.get("PREFECT_API_URL"), f"http://127.0.0.1:{port}/api")
               if url and api_healthy(url)]  # $PREFECT_API_URL, else the server of a running `make serve`
    if running:
        os.environ["PREFECT_API_URL"] = running[0]
    else:
        server, os.environ["PREFECT_API_URL"] = start_local_server(free_port())
    api = os.environ["PREFECT_API_URL"]
    try:
        from prefect.client.orchestration import get_client

        def deployment():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name(f"retrain/{cfg.deployment}")
                except Exception:  # noqa: BLE001 (not there yet)
                    return None

        def ready():  # READY once a runner polls for its runs; the UI shows "Not Ready" before that
            d = deployment()
            return d if d is not None and d.status is not None and d.status.value == "READY" else None

        if ready() is None:  # nobody serves it now (make serve is not running): serve it for the check
            serve = TiedProcess([sys.executable, "-m", "pipelines.serve", "--no-server", "--params", str(params)],
                                env={**tool_env(), "PREFECT_API_URL": api}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        dep = wait_for(ready, 180, f"a runner serving deployment retrain/{cfg.deployment}")

        def scheduled():
            from prefect.client.schemas.filters import (
                DeploymentFilter,
                DeploymentFilterId,
                FlowRunFilter,
                FlowRunFilterState,
                FlowRunFilterStateName,
            )
            from prefect.client.schemas.sorting import FlowRunSort

            with get_client(sync_client=True) as client:
                return client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(
                        any_=["Scheduled"]))), sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC)

        runs = wait_for(scheduled, 150, "the scheduler to create the upcoming runs", poll=3)
        url = f"{api.removesuffix('/api')}/deployments/deployment/{dep.id}"
        dom = browse(url, out / "prefect_deployment.png")
        missing = [text for text in (cfg.deployment, "retrain", runs[0].name, "Scheduled", "Ready") if text not in dom]
        if missing:
            raise CheckFailed(f"the Prefect UI page {url} does not show {missing}")
        return f"Prefect UI {url}: deployment {cfg.deployment}, cron '{cfg.cron}', {len(runs)} upcoming runs"
    finally:
        for proc in (serve, server):
            if proc is not None:
                stop(proc)


def check_mlflow(params: Path, out: Path) -> str:
    import mlflow

    ablate = load_section(AblationConfig, params, "ablate")
    uri = resolve_uri(load_section(TrackingConfig, params, "tracking", required=False), root=params.parent)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(ablate.experiment)
    parents = [] if exp is None else client.search_runs(
        [exp.experiment_id], "tags.`groupvit.ablation` = 'parent'", order_by=["attributes.start_time DESC"])
    children = [] if not parents else client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    if not children:
        raise CheckFailed(f"no ablation parent run with children in experiment {ablate.experiment!r} of {uri}: "
                          "run `groupvit ablate` first")
    port = free_port()
    ui = TiedProcess([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                      "--port", str(port)], env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(up, 120, f"mlflow ui on {base}")
        # ranked by held-out mIoU, best first (the compare view keeps the order of `runs`); unfinished children last
        children = sorted(children, key=lambda c: -c.data.metrics.get("miou_test", float("-inf")))
        ids = [c.info.run_id for c in children]
        query = urllib.parse.urlencode({"runs": str(ids).replace("'", '"'),
                                        "experiments": f'["{exp.experiment_id}"]'})
        url = f"{base}/#/compare-runs?{query}"
        dom = compare_view(url, out / "mlflow_ablation.png")
        names = [c.info.run_name for c in children]
        missing = [n for n in names if n not in dom]
        if missing:
            raise CheckFailed(f"the MLflow compare page {url} does not show the child runs {missing}")
        if "miou_test" not in dom:
            raise CheckFailed(f"the MLflow compare page {url} does not show the metric miou_test")
        return f"MLflow UI {url}: parent {parents[0].info.run_name} with {len(children)} children {names}"
    finally:
        stop(ui)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.ui_check", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="docs", help="folder of the screenshots (default: docs)")
    p.add_argument("--only", choices=("prefect", "mlflow"), help="check one UI only")
    p.add_argument("--prefect-port", type=int, default=4200, help="port of a running `make serve` server")
    args = p.parse_args(argv)
    params, out = Path(args.params).resolve(), Path(args.out)
    try:
        if args.only in (None, "prefect"):
            print(f"ui-check prefect: {check_prefect(params, out, args.prefect_port)}", flush=True)
        if args.only in (None, "mlflow"):
            print(f"ui-check mlflow: {check_mlflow(params, out)}", flush=True)
    except CheckFailed as e:
        print(f"ui-check failed: {e}", file=sys.stderr)
        return 1
    print(f"ui-check: screenshots in {out}/")
    return 0


if __name__ == "__main__":
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the `finally` blocks stop the servers started for the check cleanly
    # (a SIGKILL cannot be caught: then their watchdogs kill them).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    sys.exit(main())

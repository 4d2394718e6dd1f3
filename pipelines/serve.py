"""Serve the `retrain` deployment on a cron schedule (params `prefect:`), plus an unscheduled `ablation` deployment.

    .venv/bin/python -m pipelines.serve                 # uses $PREFECT_API_URL, else starts a server on 127.0.0.1:4200
    .venv/bin/python -m pipelines.serve --no-server     # fail instead of starting a server when none is configured

`make serve` runs this. The process is the runner: it polls the server, executes scheduled and manual runs as
subprocesses in `prefect.workdir`, and keeps the schedule active after Ctrl-C (`pause_on_shutdown=False`), so the
Prefect UI keeps showing the upcoming runs and they execute as soon as a runner is back.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from groupvit.config import load_section
from groupvit.errors import ConfigError
from groupvit.procs import TiedProcess
from pipelines.config import OrchestrationConfig
from pipelines.workspace import tool_env


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_local_server(port: int, wait_s: float = 120.0) -> tuple[TiedProcess, str]:
    """Start `prefect server start --host 127.0.0.1 --port <port>` and wait until its API answers.

    The server is a `TiedProcess`: it dies with this process however that ends (a SIGKILL included), instead of
    holding the port in a session of its own; `stop` shuts it down cleanly.
    """
    api_url = f"http://127.0.0.1:{port}/api"
    if api_healthy(api_url):
        raise ConfigError(f"a Prefect server already answers on {api_url}; use it with PREFECT_API_URL={api_url}")
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")
    # The UI's own API address defaults to port 4200 whatever --port says: point it at this server.
    env = {**tool_env(), "PREFECT_UI_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = TiedProcess([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()  # the server holds its own copy
    deadline = time.monotonic() + wait_s
    while not api_healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the Prefect server did not come up on {api_url} within {wait_s:g} s; see {log.name}")
        time.sleep(0.5)
    return proc, api_url


def stop(proc: subprocess.Popen[Any] | TiedProcess) -> None:
    """Stop a server from `start_local_server`, or a child started with start_new_session (its whole process group,
    which is ours): SIGTERM (a clean shutdown), SIGKILL after 30 s."""
    if isinstance(proc, TiedProcess):
        proc.stop(signal.SIGTERM, timeout=30)
    elif proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def deployments(cfg: OrchestrationConfig, workdir: Path, params_file: str) -> list[Any]:
    """The RunnerDeployments to serve: `retrain` on its cron schedule and `ablation` on demand."""
    from prefect.schedules import Cron

    from pipelines.flows import ablation, retrain

    params = {"workdir": str(workdir), "params_file": params_file}
    return [
        retrain.to_deployment(cfg.deployment, schedule=Cron(cfg.cron, timezone=cfg.timezone), parameters=params,
                              tags=["groupvit", "dvc"], description=f"dvc repro + promotion in {workdir}"),
        ablation.to_deployment("groupvit-ablation", parameters=params, tags=["groupvit", "mlflow"],
                               description="the params `ablate:` grid as MLflow child runs"),
    ]


def resolve_workdir(cfg: OrchestrationConfig, params_path: Path) -> Path:
    workdir = (params_path.parent / cfg.workdir).resolve()
    if not (workdir / "dvc.yaml").is_file():
        raise ConfigError(f"{params_path}: prefect.workdir={cfg.workdir!r} -> {workdir} has no dvc.yaml")
    return workdir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file with the `prefect:` section")
    p.add_argument("--port", type=int, default=4200, help="port of the local server started without PREFECT_API_URL")
    p.add_argument("--no-server", action="store_true", help="require PREFECT_API_URL instead of starting a server")
    args = p.parse_args(argv)
    params_path = Path(args.params).resolve()
    try:
        cfg = load_section(OrchestrationConfig, params_path, "prefect", required=False)
        workdir = resolve_workdir(cfg, params_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        if args.no_server:
            print("error: PREFECT_API_URL is not set (e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
            return 2
        server, os.environ["PREFECT_API_URL"] = start_local_server(args.port)
        print(f"Prefect server on {os.environ['PREFECT_API_URL'][:-4]} (UI), logs in $PREFECT_HOME/server.log",
              flush=True)
    try:
        # Prefect reads PREFECT_API_URL when imported, so import it only now.
        from prefect import serve

        print(f"serving deployment retrain/{cfg.deployment}: cron '{cfg.cron}' ({cfg.timezone}) in {workdir}",
              flush=True)
        serve(*deployments(cfg, workdir, params_path.name if params_path.parent == workdir else str(params_path)),
              pause_on_shutdown=False)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

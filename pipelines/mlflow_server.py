"""`make mlflow-server`: a shared MLflow tracking server (sqlite store, artifacts proxied through the server).

    .venv/bin/python -m pipelines.mlflow_server --port 5000            # store and artifacts in .mlflow-server/
    .venv/bin/python -m pipelines.mlflow_server --host 0.0.0.0 --allowed-hosts mlflow.lab:5000 \\
        --backend-store-uri postgresql://... --artifacts s3://bucket/mlflow      # a cluster's server: see README

Clients need only the URL (params `tracking.uri: http://host:5000`, or `--set tracking.uri=...`): runs, metrics and
the model registry go over the REST API, and artifacts are uploaded to and downloaded from the server
(`mlflow-artifacts:/` URIs), so no client needs the artifact store's path or credentials.

The server runs as a `groupvit.procs.TiedProcess`: Ctrl-C, SIGTERM and SIGHUP stop it with its uvicorn workers, and
it dies with this process even when that is killed with SIGKILL.
"""
from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from groupvit.errors import ConfigError
from pipelines.common import run_stage

DEFAULT_DIR = ".mlflow-server"


def server_command(backend_store_uri: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line, with artifacts proxied through the server (`--serve-artifacts`).

    Args:
        backend_store_uri: runs and model registry (`sqlite:///<file>`, `postgresql://...`).
        artifacts: where the server keeps artifacts (an absolute folder, `s3://...`); clients never see it.
        host: interface to bind; port: its TCP port; workers: uvicorn worker processes.
    """
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            hint = "another server (make mlflow-server?) listens there" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"mlflow server: cannot listen on {host}:{port} ({hint}); pick another port: "
                              "make mlflow-server MLFLOW_PORT=<port> (or --port)") from None


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m pipelines.mlflow_server` (what `make mlflow-server` passes)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.mlflow_server", description=__doc__.splitlines()[0],
                                allow_abbrev=False)  # an abbreviation must not take an `mlflow server` option
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"folder of the sqlite store and the artifacts (default: {DEFAULT_DIR}, git-ignored)")
    p.add_argument("--backend-store-uri", help="runs and registry store (default: sqlite:///<dir>/mlflow.db)")
    p.add_argument("--artifacts", help="where the server stores artifacts: a folder or s3://, gs://... "
                                       "(default: <dir>/artifacts)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default: 2)")
    p.epilog = "Any other option is passed on to `mlflow server` (e.g. --allowed-hosts mlflow.lab.example:5000)."
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the server until it exits or this process is stopped; returns its exit status (2: a config error)."""
    args, extra = parser().parse_known_args(argv)

    def body() -> int:
        from groupvit.procs import TiedProcess
        from pipelines.workspace import tool_env

        folder = Path(args.dir).resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / ".gitignore").exists():  # the store is this machine's, never part of the repository
                (folder / ".gitignore").write_text("*\n")
        except OSError as e:
            raise ConfigError(f"mlflow server: cannot use the folder {folder} ({e.strerror})") from None
        store = args.backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
        artifacts = args.artifacts or str(folder / "artifacts")
        if urlparse(artifacts).scheme == "":
            artifacts = str(Path(artifacts).resolve())
        _check_port_free(args.host, args.port)
        cmd = server_command(store, artifacts, args.host, args.port, args.workers) + extra
        print(f"mlflow-server: http://{args.host}:{args.port} (store {store}, artifacts {artifacts}); clients: "
              f"tracking.uri http://<this host>:{args.port}. Ctrl-C stops it.", flush=True)
        # MLflow's job runner (GenAI scorers, trace rollups) is of no use here: without it the server starts and
        # stops in seconds fewer
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **tool_env()}
        server = TiedProcess(cmd, env=env)
        try:
            return server.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            if server.poll() is None:
                server.stop(signal.SIGTERM, timeout=30)  # uvicorn's clean shutdown, then SIGKILL of the whole tree

    return run_stage(body)


if __name__ == "__main__":
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the `finally` above stops the server and its workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    sys.exit(main())

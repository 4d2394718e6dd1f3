"""The `retrain` deployment on a Prefect `process` work pool, and a worker for it in this checkout (many machines).

    .venv/bin/python -m pipelines.deploy           # `make deploy`: create the pool if missing, deploy retrain to it
    .venv/bin/python -m pipelines.deploy worker    # `make worker`: a worker running the pool's runs in this checkout

Both talk to the Prefect server at $PREFECT_API_URL (default http://127.0.0.1:4200/api) and stop with a one-line
error before doing anything when it does not answer. The deployment carries no code: its pull step enters the
checkout the worker was started in ($GROUPVIT_CHECKOUT, which `worker` sets), so each training machine runs its own
clone of the repository (its own DVC workspace, data and cache) and `retrain` runs there with `workdir` =
`prefect.workdir`. A run whose machine is lost stops sending heartbeats; the automation `deploy` creates marks it
Crashed after `prefect.crash_after_seconds` (without it Prefect's server would show it Running for ever).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from groupvit.config import load_section
from groupvit.errors import ConfigError
from pipelines.config import OrchestrationConfig
from pipelines.serve import api_healthy

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
CHECKOUT_VAR = "GROUPVIT_CHECKOUT"
ENTRYPOINT = "pipelines/flows.py:retrain"
# Prefect's own pull step, run by the flow run's process on the worker's machine before the flow is loaded: enter
# the checkout the worker was started in (Prefect fills `{{ $VAR }}` from that process's environment).
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $GROUPVIT_CHECKOUT }}"}}]


@dataclass(frozen=True)
class Target:
    """What `deploy` and `worker` act on: the params file, its `prefect:` section and the Prefect API."""

    params: Path
    cfg: OrchestrationConfig
    api_url: str

    @property
    def checkout(self) -> Path:
        """The repository the params file is in (where `pipelines/flows.py` is)."""
        return self.params.parent

    @property
    def flow_run_parameters(self) -> dict[str, str]:
        """`retrain`'s parameters, relative to the worker's checkout."""
        return {"workdir": self.cfg.workdir, "params_file": self.params.name}


def resolve_target(params: str | os.PathLike[str], api_url: str | None = None) -> Target:
    """Read the params file and check the Prefect API answers, before anything is changed.

    Raises:
        ConfigError: the params file or its `prefect:` section is wrong, the checkout has no `retrain` flow, or no
            Prefect API answers at `api_url` (default $PREFECT_API_URL, else 127.0.0.1:4200).
    """
    path = Path(params).resolve()
    cfg = load_section(OrchestrationConfig, path, "prefect", required=False)
    if cfg.crash_after_seconds <= cfg.heartbeat_seconds:
        raise ConfigError(f"{path}: prefect.crash_after_seconds={cfg.crash_after_seconds:g} must be larger than "
                          f"prefect.heartbeat_seconds={cfg.heartbeat_seconds} (a few heartbeats, e.g. 3x)")
    if not (path.parent / ENTRYPOINT.split(":")[0]).is_file():
        raise ConfigError(f"{path}: {path.parent} is not a checkout of this project (no {ENTRYPOINT.split(':')[0]})")
    if not (path.parent / cfg.workdir / "dvc.yaml").is_file():
        raise ConfigError(f"{path}: prefect.workdir={cfg.workdir!r} -> {(path.parent / cfg.workdir).resolve()} has "
                          "no dvc.yaml")
    url = api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
    if not api_healthy(url, timeout=5.0):
        raise ConfigError(f"no Prefect server answers at {url} (PREFECT_API_URL): start one (`.venv/bin/prefect "
                          "server start`) or point PREFECT_API_URL at yours")
    return Target(path, cfg, url)


def ensure_pool(client: Any, name: str) -> bool:
    """Create the `process` work pool `name` unless it exists; True when it was created.

    Raises:
        ConfigError: a pool of that name exists with another type (its workers could not run this deployment).
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type="process", description="GroupViT training machines",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        return True
    if pool.type != "process":
        raise ConfigError(f"prefect.work_pool={name!r}: that work pool has type {pool.type!r}, expected 'process' "
                          "(choose another name, or delete it with `prefect work-pool delete`)")
    return False


def crash_automation(cfg: OrchestrationConfig, deployment_id: Any) -> Any:
    """Prefect's zombie-run detection (its automation recipe for self-hosted servers), for this deployment's runs.

    A run is marked Crashed when no event (heartbeat or state change) follows its last heartbeat within
    `crash_after_seconds`: its machine, or its worker, was lost (Prefect would show it Running for ever otherwise).
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    after = f"{cfg.crash_after_seconds:g} s"
    return AutomationCore(
        name=f"{cfg.deployment}: crash runs without heartbeat",
        description=f"retrain/{cfg.deployment}: no heartbeat for {after} means its worker's machine was lost",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=cfg.crash_after_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat from this flow run for {after} (prefect.crash_after_seconds): its worker's machine or "
            "process was lost mid-run; stages it had not finished published nothing. Rerun it: DVC reruns only "
            "what is stale"))],
    )


def deploy(target: Target) -> Any:
    """Create the pool if missing, deploy `retrain` to it on the cron schedule, and the lost-run automation.

    Idempotent: a rerun updates the deployment (schedule, parameters) and replaces its automation.

    Returns:
        The deployment's id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.utilities.callables import parameter_schema

    from pipelines.flows import retrain

    cfg = target.cfg
    with get_client(sync_client=True) as client:
        created = ensure_pool(client, cfg.work_pool)
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name(retrain.name), name=cfg.deployment, work_pool_name=cfg.work_pool,
            entrypoint=ENTRYPOINT, pull_steps=PULL_STEPS, parameters=target.flow_run_parameters,
            parameter_openapi_schema=parameter_schema(retrain).model_dump_for_openapi(),
            schedules=[DeploymentScheduleCreate(schedule=CronSchedule(cron=cfg.cron, timezone=cfg.timezone))],
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(cfg.heartbeat_seconds)}},
            tags=["groupvit", "dvc"], description=f"dvc repro + promotion in the checkout of the worker that runs it "
                                                  f"(work pool {cfg.work_pool})")
        automation = crash_automation(cfg, deployment_id)
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        client.create_automation(automation)
    print(f"{'created' if created else 'using'} work pool {cfg.work_pool!r} (process) on {target.api_url}")
    print(f"deployed retrain/{cfg.deployment} to it: cron '{cfg.cron}' ({cfg.timezone}), parameters "
          f"{target.flow_run_parameters}; a worker runs it in its own checkout (make worker)")
    return deployment_id


def worker_command(target: Target, name: str | None = None) -> tuple[list[str], dict[str, str]]:
    """`prefect worker start` for the pool, one run at a time (the DVC workspace is exclusive), and its env."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", target.cfg.work_pool, "--type", "process",
           "--limit", "1", "--name", name or f"{socket.gethostname()}:{target.checkout.name}",
           "--install-policy", "never", "--no-create-pool-if-not-found"]
    env = {**os.environ, "PREFECT_API_URL": target.api_url, CHECKOUT_VAR: str(target.checkout)}
    return cmd, env


def check_pool(target: Target) -> None:
    """Raises ConfigError when the pool does not exist yet (nothing would ever be deployed to it)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(target.cfg.work_pool)
        except ObjectNotFound:
            raise ConfigError(f"work pool {target.cfg.work_pool!r} (prefect.work_pool) does not exist on "
                              f"{target.api_url}: run `make deploy` once, from any checkout") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.splitlines()[0])
    p.add_argument("action", nargs="?", choices=("deploy", "worker"), default="deploy",
                   help="deploy: the pool and the retrain deployment (once); worker: run its flow runs here")
    p.add_argument("--params", default="params.yaml", help="params file with the `prefect:` section, in the checkout")
    p.add_argument("--name", help="worker name (default <host>:<checkout folder>)")
    args = p.parse_args(argv)
    try:
        target = resolve_target(args.params)
        os.environ["PREFECT_API_URL"] = target.api_url  # before Prefect reads its settings
        if args.action == "deploy":
            deploy(target)
            return 0
        check_pool(target)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd, env = worker_command(target, args.name)
    print(f"worker for pool {target.cfg.work_pool!r} on {target.api_url}, running flow runs in {target.checkout}",
          flush=True)
    # The worker replaces this process: signals (Ctrl-C, SIGTERM) reach it directly, and nothing is left behind.
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

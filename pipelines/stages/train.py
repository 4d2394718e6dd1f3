"""`groupvit train`: train GroupViT on the webdataset shards, resumably, on one CPU, one GPU or many processes.

DVC stage (for dvc.yaml; after `nouns`):
    cmd:     groupvit train
    deps:    data/shards, data/nouns (the `data.shards_dir` / `data.nouns_dir` defaults), groupvit/model,
             groupvit/losses.py, groupvit/tokenizer.py, groupvit/data, groupvit/training, pipelines/stages/train.py,
             pipelines/tracking.py
    params:  base.seed, model, data, train, tracking (whole sections)
    outs:    data/train   (persist: true, cache: false; checkpoints/step_XXXXXX.pt + checkpoints/latest, so a
                           killed `dvc repro` resumes instead of restarting; resolved_config.yaml, mlflow_run.json)
             data/model   (model.safetensors, config.json, resolved_config.yaml; mlflow.json, the run and registered
                           version of these weights, is machine-local and kept out of the DVC hash by .dvcignore)
    metrics: metrics/train.json (cache: false)
    plots:   metrics/train_loss.csv (cache: false; x: step, y: loss, loss_itc, loss_ml, lr)

Options: `--train-dir`, `--model-dir`, `--metrics-dir` (the outs above), `--run-name` (MLflow run name; e.g. `--run-name
train_baseline` for the baseline stage), `--launcher auto|torchrun|none`.

Processes: `train.nproc` (`auto` = one per GPU, 1 on CPU). With more than one, or `--launcher torchrun`, the stage
re-executes itself as `python -m torch.distributed.run --standalone --nproc_per_node N -m pipelines.stages.train
--worker ...` (NCCL on GPUs, gloo on CPU). For several machines, start the workers with torchrun yourself (README,
"Training"). Only rank 0 writes files and talks to MLflow; it checks the tracking store before any work.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from groupvit.config import flat_dict, save_resolved, to_dict
from groupvit.errors import ConfigError
from groupvit.training.config import TrainConfig
from pipelines.common import load, load_base, run_stage, stage_parser
from pipelines.tracking import TrackingConfig, write_model_record

log = logging.getLogger("groupvit.train")
CURVE_FIELDS = ("step", "loss", "loss_itc", "loss_ml", "lr")
# Keys that may change between a run and its resumption (bookkeeping, speed, where to log); any other change in the
# resolved config makes `groupvit train` start afresh instead of resuming an incompatible checkpoint.
RESUMABLE_CHANGES = ("train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.resume", "train.threads",
                     "train.nproc", "train.dist_timeout_s", "train.max_minutes", "train.compile", "data.num_workers",
                     "model.attn_impl", "model.fused_proj", "model.trim_text_padding", "model.grad_checkpointing",
                     "tracking.")


def resume_key(configs: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration a checkpoint must match to be resumed (stored in every checkpoint)."""
    flat = flat_dict({k: to_dict(v) for k, v in configs.items()})
    return {k: v for k, v in flat.items() if not k.startswith(RESUMABLE_CHANGES)}


def parser() -> argparse.ArgumentParser:
    p = stage_parser("train", "train GroupViT (torchrun/DDP when more than one process), resumable, MLflow-tracked")
    p.add_argument("--train-dir", default="data/train", help="checkpoints and run state (default: data/train)")
    p.add_argument("--model-dir", default="data/model", help="final model folder (default: data/model)")
    p.add_argument("--metrics-dir", default="metrics", help="train.json and train_loss.csv (default: metrics)")
    p.add_argument("--run-name", default="train", help="MLflow run name (default: train)")
    p.add_argument("--launcher", choices=("auto", "torchrun", "none"), default="auto",
                   help="auto: torchrun when train.nproc > 1; torchrun: always; none: this process only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the launcher for each rank
    return p


def resolve_nproc(nproc: int | str) -> int:
    """`auto`: one process per visible GPU, else 1."""
    if nproc != "auto":
        return int(nproc)
    import torch

    return max(1, torch.cuda.device_count())


def launch(argv: list[str], nproc: int) -> int:
    """Re-run this stage as `nproc` torchrun workers on this machine and wait; torchrun's exit code is ours.

    When one worker dies, torchrun's agent stops the others and exits non-zero (no hang); SIGTERM/SIGINT to this
    process are forwarded so DVC/Prefect cancellation stops the workers too.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=0", "-m", "pipelines.stages.train", "--worker", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if rc != 0:
        print(f"error: training failed (torchrun exit code {rc}); see the worker errors above", file=sys.stderr)
    return 1 if rc else 0


def _write_atomic(path: Path, text: str) -> None:
    from groupvit.training.checkpointing import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def curve_csv(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] if k == "step" else f"{r[k]:.6g}" for k in CURVE_FIELDS})
    return buf.getvalue()


def publish_model(model_dir: Path, state_dict: dict, model_cfg: Any, configs: dict[str, Any]) -> None:
    """Write the final model into a sibling temp folder and swap it in: a failed run never touches a good model."""
    from groupvit.training.checkpointing import save_model

    tmp = model_dir.with_name(f".{model_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, state_dict, to_dict(model_cfg))
    save_resolved(tmp / "resolved_config.yaml", **configs)
    old = model_dir.with_name(f".{model_dir.name}.old{os.getpid()}")
    if model_dir.exists():
        os.replace(model_dir, old)
    os.replace(tmp, model_dir)
    shutil.rmtree(old, ignore_errors=True)


class RunTracker:
    """Rank 0's MLflow run: resolved config as params, git/DVC tags, per-log-step metrics, system metrics, the model
    files and loss curve as artifacts, and a model-registry version. A no-op on the other ranks.

    A resumed training continues the MLflow run of its checkpoints (its id is kept in `<train dir>/mlflow_run.json`).
    """

    def __init__(self, cfg: TrackingConfig, train_dir: Path, enabled: bool, run_name: str = "train"):
        self.cfg, self.run_file, self.enabled, self.run_name = cfg, train_dir / "mlflow_run.json", enabled, run_name
        self.run_id, self.uri = "", ""

    def _resumable_run(self, resume: bool) -> str | None:
        if not (resume and self.run_file.is_file()):
            return None
        import mlflow

        saved = json.loads(self.run_file.read_text())
        if saved.get("tracking_uri") != self.uri or saved.get("experiment") != self.cfg.experiment:
            return None
        try:
            return mlflow.get_run(saved["run_id"]).info.run_id
        except mlflow.exceptions.MlflowException:
            return None

    @contextlib.contextmanager
    def run(self, params: dict[str, Any], data_paths: tuple[str, ...], resume: bool) -> Iterator[None]:
        """Open the MLflow run: the checkpoints' run when `resume` (training continues them), else a new one."""
        if not self.enabled:
            yield
            return
        import mlflow

        from pipelines.tracking import dvc_data_hashes, git_commit, setup

        self.uri = setup(self.cfg)
        resume_id = self._resumable_run(resume)
        tags = {"stage": "train", "git_commit": git_commit(),
                **{f"dvc.{path}": md5 for path, md5 in dvc_data_hashes(data_paths).items()}}
        with mlflow.start_run(run_id=resume_id, run_name=None if resume_id else self.run_name,
                              log_system_metrics=self.cfg.system_metrics) as run:
            self.run_id = run.info.run_id
            mlflow.set_tags(tags)
            _write_atomic(self.run_file, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                                     "experiment": self.cfg.experiment}) + "\n")
            logged = mlflow.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
            if changed:
                log.warning("resumed MLflow run %s keeps its original values of %s", self.run_id, ", ".join(changed))
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            yield

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def finish(self, model_dir: Path, metrics: dict[str, Any], curve: Path) -> dict[str, Any] | None:
        """Log the final model, metrics and curve; register the model. Returns where it is registered."""
        if not self.enabled:
            return None
        import mlflow

        from pipelines.tracking import register_model

        mlflow.log_metrics({f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(model_dir), "model")
        mlflow.log_artifact(str(curve))
        out = {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.cfg.experiment,
               "artifact_uri": mlflow.get_artifact_uri("model")}
        if self.cfg.registered_model:
            version = register_model(self.cfg.registered_model, self.run_id, "model")
            out.update(name=self.cfg.registered_model, version=int(version),
                       model_uri=f"models:/{self.cfg.registered_model}/{version}")
        return out


def worker(args: argparse.Namespace) -> int:
    """One training process (rank 0 of 1 when run plainly)."""
    import torch

    from groupvit.data.loader import DataConfig, make_train_loader, shared_skip_counter
    from groupvit.losses import GroupViTLoss
    from groupvit.model import GroupViT, ModelConfig
    from groupvit.training import destroy_distributed, fit, init_distributed, will_resume
    from groupvit.training.distributed import all_gather_object, device_for

    train_cfg = load(TrainConfig, args, "train")
    model_cfg = load(ModelConfig, args, "model")
    data_cfg = load(DataConfig, args, "data")
    track_cfg = load(TrackingConfig, args, "tracking")
    base_cfg = load_base(args)
    seed = base_cfg.seed
    configs = {"base": base_cfg, "model": model_cfg, "data": data_cfg, "train": train_cfg,
               "tracking": track_cfg}
    if data_cfg.image_size != model_cfg.image_size:
        raise ConfigError(f"{args.params}: data.image_size ({data_cfg.image_size}) must equal the model's image_size "
                          f"({model_cfg.image_size}, from model.preset {model_cfg.preset!r} or model.image_size)")

    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        # torchrun stops surviving workers with SIGTERM: unwind, so the MLflow run is marked failed, not left running
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = init_distributed(train_cfg.dist_timeout_s)
    try:
        if info.is_main:  # before any work: an unreachable tracking server fails now, not after training
            from pipelines.tracking import check_reachable, resolve_uri

            check_reachable(resolve_uri(track_cfg))
        device = device_for(info)
        if device.type == "cpu":
            torch.set_num_threads(train_cfg.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        skips = shared_skip_counter()  # bad samples skipped by this rank's loaders, in all their worker processes

        def loader(epoch: int):
            nouns = data_cfg.nouns_dir if data_cfg.multi_label else None
            return make_train_loader(data_cfg.shards_dir, nouns, data_cfg, batch_size=train_cfg.batch_size,
                                     rank=info.rank, world_size=info.world_size, seed=seed + epoch,
                                     context_length=model_cfg.context_length, skip_counter=skips)

        first, num_batches, num_samples = loader(0)
        torch.manual_seed(seed)  # the same initial weights whatever the world size (DDP also broadcasts rank 0's)
        model = GroupViT(model_cfg)
        loss_fn = GroupViTLoss(multi_label=data_cfg.multi_label > 0, patch_weight=model_cfg.multi_label_patches)
        if model.multi_label_logit_scale is not None and data_cfg.multi_label == 0:
            # no prompts, no multi-label loss: keep the scale out of training (DDP rejects parameters without grads)
            model.multi_label_logit_scale.requires_grad_(False)
        steps_per_epoch = num_batches // train_cfg.grad_accum
        if steps_per_epoch < 1:
            raise ConfigError(f"train.grad_accum: {train_cfg.grad_accum} micro-batches per step but an epoch has only "
                              f"{num_batches} batches of {train_cfg.batch_size} per process")
        extra = {"world_size": info.world_size, "global_batch": train_cfg.batch_size * info.world_size *
                 train_cfg.grad_accum, "lr_effective": train_cfg.lr * train_cfg.lr_factor(info.world_size),
                 "steps_per_epoch": steps_per_epoch, "num_samples": num_samples, "device": str(device),
                 "torch": torch.__version__}
        train_dir = Path(args.train_dir)
        if info.is_main:
            save_resolved(train_dir / "resolved_config.yaml", **configs)

        def batches(epoch: int):
            return first if epoch == 0 else loader(epoch)[0]

        tracker = RunTracker(track_cfg, train_dir, enabled=info.is_main, run_name=args.run_name)
        run_config = resume_key(configs)
        with tracker.run(params={**flat_dict({k: to_dict(v) for k, v in configs.items()}),
                                 **{f"run.{k}": v for k, v in extra.items()}},
                         data_paths=(data_cfg.shards_dir, data_cfg.nouns_dir),
                         resume=info.is_main and will_resume(train_dir, run_config, train_cfg)):
            result = fit(model, loss_fn, batches, cfg=train_cfg, steps_per_epoch=steps_per_epoch, info=info,
                         device=device, seed=seed, checkpoint_dir=train_dir, run_config=run_config,
                         log_fn=tracker.log_metrics)
            # every rank's count (collective: after fit, which all ranks leave together); it includes samples the
            # workers read ahead of the last step
            skipped = sum(all_gather_object(skips.value, info))
            if info.is_main:
                model_dir, metrics_dir = Path(args.model_dir), Path(args.metrics_dir)
                publish_model(model_dir, model.state_dict(), model_cfg, configs)
                # a wall-clock budget is the only thing that lets the machine's speed decide the length: say so
                full = train_cfg.steps or math.ceil(train_cfg.epochs * steps_per_epoch)
                planned_by = "time budget" if result.planned_steps < full else "length"
                metrics = {"final_loss": result.final_loss, "steps": result.step,
                           "planned_steps": result.planned_steps, "planned_by": planned_by,
                           "max_minutes": train_cfg.max_minutes, "images_per_s": round(result.images_per_s, 3),
                           "wall_s": round(result.wall_s, 1), "stopped_by_budget": result.stopped_by_budget,
                           "world_size": info.world_size, "global_batch": extra["global_batch"],
                           "skipped_samples": skipped}
                _write_atomic(metrics_dir / "train_loss.csv", curve_csv(result.curve))
                registered = tracker.finish(model_dir, metrics, metrics_dir / "train_loss.csv")
                if registered:
                    write_model_record(model_dir, registered)
                _write_atomic(metrics_dir / "train.json", json.dumps(metrics, indent=2) + "\n")
                if planned_by == "time budget":
                    print(f"train: the {train_cfg.max_minutes:g}-minute budget (train.max_minutes) planned "
                          f"{result.planned_steps} of {full} steps; the result depends on this machine's speed")
                print(f"train: {result.step} steps, final loss {result.final_loss:.4f}, "
                      f"{result.images_per_s:.1f} images/s, {result.wall_s:.0f} s; model in {model_dir}"
                      + (f", registered as {registered['model_uri']}" if registered and "model_uri" in registered
                         else ""))
        return 0
    finally:
        destroy_distributed()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)

    def body() -> int:
        from groupvit.data.loader import DataConfig
        from groupvit.model import ModelConfig

        train_cfg = load(TrainConfig, args, "train")  # validate every section before spawning processes
        load(ModelConfig, args, "model"), load(DataConfig, args, "data"), load_base(args)
        nproc = resolve_nproc(train_cfg.nproc)
        if not args.worker and (args.launcher == "torchrun" or (args.launcher == "auto" and nproc > 1)):
            from pipelines.tracking import check_reachable, resolve_uri

            check_reachable(resolve_uri(load(TrackingConfig, args, "tracking")))
            return launch(argv, nproc)
        return worker(args)

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())

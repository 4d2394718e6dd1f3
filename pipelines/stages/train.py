"""`groupvit train`: train GroupViT on the webdataset shards, resumably, on one CPU, one GPU or many processes.

DVC stage (dvc.yaml `train`, after `nouns`; deps: the data and every code file it runs, listed there): outs
`data/train` (persist, not cached: checkpoints/step_XXXXXX.pt + checkpoints/latest, so a killed `dvc repro` resumes;
resolved_config.yaml, mlflow_run.json), `data/model` (model.safetensors, config.json, resolved_config.yaml;
`mlflow.json`, the run and registered version of these weights, is machine-local and outside the DVC hash), metrics
`metrics/train.json`, plots `metrics/train_loss.csv` (step, loss, loss_itc, loss_ml, lr).

Options: `--train-dir`, `--model-dir`, `--metrics-dir` (the outs above), `--run-name` (MLflow run name; the baseline
stage: `--run-name train/vit_pixelwise`), `--launcher auto|torchrun|none`.

Processes: `train.nproc` (`auto` = one per GPU, 1 on CPU). With more than one, or `--launcher torchrun`, the stage
re-runs itself as torchrun workers (`pipelines/launch.py`; NCCL on GPUs, gloo on CPU). Several machines: the same
command on every node with `--nnodes N --rdzv-endpoint host:port` (or `$GROUPVIT_NNODES`, ...; README "Many
machines"), `--train-dir` on storage every node shares. Only rank 0 writes files and talks to MLflow (the run:
`pipelines.tracking.RunTracker`); it checks the tracking store before any work.

The multi-node options are command-line options and environment variables, not params: a node's rank differs
between nodes that share one params.yaml, the endpoint names this cluster's hosts, and neither changes what is
trained (the world size, `run.world_size` in MLflow, and the checkpoints' resume check cover that).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from groupvit.atomic import atomic_write
from groupvit.config import flat_dict, save_resolved, to_dict
from groupvit.errors import ConfigError
from groupvit.training.config import TrainConfig
from pipelines.common import load, load_base, run_stage, stage_parser
from pipelines.launch import add_multinode_arguments, launch, multinode_options, resolve_nproc, worker_process
from pipelines.tracking import RunTracker, TrackingConfig, check_reachable, resolve_uri, write_model_record


def parser() -> argparse.ArgumentParser:
    p = stage_parser("train", "train GroupViT (torchrun/DDP when more than one process), resumable, MLflow-tracked")
    p.add_argument("--train-dir", default="data/train", help="checkpoints and run state (default: data/train)")
    p.add_argument("--model-dir", default="data/model", help="final model folder (default: data/model)")
    p.add_argument("--metrics-dir", default="metrics", help="train.json and train_loss.csv (default: metrics)")
    p.add_argument("--run-name", default="train/groupvit",
                   help="MLflow run name (default: train/groupvit; the baseline stage: train/vit_pixelwise)")
    p.add_argument("--launcher", choices=("auto", "torchrun", "none"), default="auto",
                   help="auto: torchrun when train.nproc > 1; torchrun: always; none: this process only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the launcher for each rank
    add_multinode_arguments(p)
    return p


def worker(args: argparse.Namespace) -> int:
    """One training process (rank 0 of 1 when run plainly)."""
    import torch

    from groupvit.checkpoint import save_pretrained
    from groupvit.data.config import DataConfig
    from groupvit.data.loader import make_train_loader, shared_skip_counter
    from groupvit.losses import GroupViTLoss
    from groupvit.model import GroupViT, ModelConfig
    from groupvit.training import fit, resume_key, will_resume
    from groupvit.training.distributed import all_gather_object

    configs = {"base": load_base(args), "model": load(ModelConfig, args, "model"),
               "data": load(DataConfig, args, "data"), "train": load(TrainConfig, args, "train"),
               "tracking": load(TrackingConfig, args, "tracking")}
    model_cfg, data_cfg, train_cfg, track_cfg = configs["model"], configs["data"], configs["train"], configs["tracking"]
    seed = configs["base"].seed
    if data_cfg.image_size != model_cfg.image_size:
        raise ConfigError(f"{args.params}: data.image_size ({data_cfg.image_size}) must equal the model's image_size "
                          f"({model_cfg.image_size}, from model.preset {model_cfg.preset!r} or model.image_size)")

    with worker_process(train_cfg.dist_timeout_s, threads=train_cfg.threads) as (info, device):
        if info.is_main:  # before any work: an unreachable tracking server fails now, not after training
            check_reachable(resolve_uri(track_cfg))
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
        extra = {"world_size": info.world_size,
                 "global_batch": train_cfg.batch_size * info.world_size * train_cfg.grad_accum,
                 "lr_effective": train_cfg.lr * train_cfg.lr_factor(info.world_size),
                 "steps_per_epoch": steps_per_epoch, "num_samples": num_samples, "device": str(device),
                 "torch": torch.__version__}
        train_dir, model_dir, metrics_dir = Path(args.train_dir), Path(args.model_dir), Path(args.metrics_dir)
        if info.is_main:
            save_resolved(train_dir / "resolved_config.yaml", **configs)  # atomically (groupvit.atomic)

        tracker = RunTracker(track_cfg, train_dir, enabled=info.is_main, run_name=args.run_name)
        run_config = resume_key(configs)
        with tracker.run(params={**flat_dict({k: to_dict(v) for k, v in configs.items()}),
                                 **{f"run.{k}": v for k, v in extra.items()}},
                         data_paths=(data_cfg.shards_dir, data_cfg.nouns_dir),
                         resume=info.is_main and will_resume(train_dir, run_config, train_cfg)):
            result = fit(model, loss_fn, lambda epoch: first if epoch == 0 else loader(epoch)[0], cfg=train_cfg,
                         steps_per_epoch=steps_per_epoch, info=info, device=device, seed=seed,
                         checkpoint_dir=train_dir, run_config=run_config, log_fn=tracker.log_metrics)
            # every rank's count (collective: after fit, which all ranks leave together); it includes samples the
            # workers read ahead of the last step
            skipped = sum(all_gather_object(skips.value, info))
            if not info.is_main:
                return 0
            save_pretrained(model, model_dir, extra=lambda tmp: save_resolved(tmp / "resolved_config.yaml", **configs))
            metrics = {**result.summary(train_cfg, steps_per_epoch, info.world_size), "skipped_samples": skipped}
            curve = atomic_write(metrics_dir / "train_loss.csv", result.curve_csv())
            registered = tracker.finish(model_dir, metrics, curve)
            if registered:
                write_model_record(model_dir, registered)
            atomic_write(metrics_dir / "train.json", json.dumps(metrics, indent=2) + "\n")
            if metrics["planned_by"] == "time budget":  # the machine's speed decided the length: say so
                print(f"train: the {train_cfg.max_minutes:g}-minute budget (train.max_minutes) planned "
                      f"{result.planned_steps} of {result.full_steps(train_cfg, steps_per_epoch)} steps; the result "
                      "depends on this machine's speed")
            print(f"train: {result.step} steps, final loss {result.final_loss:.4f}, {result.images_per_s:.1f} "
                  f"images/s, {result.wall_s:.0f} s; model in {model_dir}"
                  + (f", registered as {registered['model_uri']}" if registered and "model_uri" in registered else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)

    def body() -> int:
        from groupvit.data.config import DataConfig
        from groupvit.model import ModelConfig

        train_cfg = load(TrainConfig, args, "train")  # validate every section before spawning processes
        load(ModelConfig, args, "model"), load(DataConfig, args, "data"), load_base(args)
        nproc = resolve_nproc(train_cfg.nproc)
        if args.worker:
            return worker(args)
        opts = multinode_options(args, nproc)
        if opts.multinode and args.launcher == "none":
            raise ConfigError(f"--launcher none runs one plain process: it cannot join a {opts.nnodes}-node job "
                              "(drop --launcher none, or --nnodes / $GROUPVIT_NNODES)")
        if args.launcher == "none" or (args.launcher == "auto" and nproc <= 1 and not opts.multinode):
            return worker(args)
        check_reachable(resolve_uri(load(TrackingConfig, args, "tracking")))
        metrics = Path(args.metrics_dir) / "train.json"
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        rc = launch(opts, ["-m", "pipelines.stages.train", "--worker", *argv])
        if rc != 0:
            print(f"error: training failed (torchrun exit code {rc}); see the worker errors above", file=sys.stderr)
        elif opts.multinode and (metrics.stat().st_mtime_ns if metrics.exists() else None) == before:
            # global rank 0 ran elsewhere: a `dvc repro` on this node would find no outputs
            print(f"train: global rank 0 ran on another node: the model, {metrics} and the MLflow run were written "
                  "there (or to the shared folders given as --model-dir / --metrics-dir)")
        return 1 if rc else 0

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())

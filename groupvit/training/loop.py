"""The training loop: DDP, mixed precision, gradient accumulation, clipping, per-step schedule, resumable checkpoints.

Tracking is injected (`log_fn(step, metrics)` runs on rank 0 on log steps), so this module never imports MLflow.
Host syncs (`.item()`, all-reduces of metrics) happen only on log and checkpoint steps.

Resumption is exact: a checkpoint holds the model, optimizer, grad scaler, schedule, step, the planned total and every
rank's RNG states; the data of epoch e is drawn from an iterator whose seeds depend only on (seed, epoch, rank), and a
restart skips the batches already consumed in that epoch without touching the training RNG streams.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from groupvit.model import compile_model
from groupvit.training import checkpointing as ckpt
from groupvit.training.config import TrainConfig
from groupvit.training.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    broadcast_object,
    seed_everything,
)
from groupvit.training.optim import build_optimizer
from groupvit.training.result import TrainResult
from groupvit.training.resume import stale_reason
from groupvit.training.schedule import WarmupCosine

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (pixels [B,3,S,S], tokens [B,1+K,L])
BatchSource = Callable[[int], Iterable[Batch]]  # epoch -> that epoch's batches (same count on every rank)
LogFn = Callable[[int, dict[str, float]], None]
# The budget probe times steps _BUDGET_PROBE_AFTER+1 .. _BUDGET_PROBE_AFTER+_BUDGET_PROBE_STEPS. The first steps are
# slow while the loader workers, the allocator and MLflow's system-metrics thread start: on 2 cores, timing steps 2-6
# gave 0.45-0.62 s/step in three runs against 0.40 steady, so a budgeted run planned up to a third too few steps;
# steps 6-15 gave 0.38-0.44 in four.
_BUDGET_PROBE_AFTER = 5
_BUDGET_PROBE_STEPS = 10
# Checkpoints, metric logs and step-to-step noise are not in the probed steps: planning for all the time left overran a
# 2-minute budget at step 290 of 314 (cosine unfinished); 90% of it finishes in time.
_BUDGET_SHARE = 0.9


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept, nothing later is written."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`: bf16 becomes fp16 (with a grad scaler) on GPUs without bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: training in fp16 with a gradient scaler instead")
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@contextlib.contextmanager
def _isolated_rng(seed: int, rank: int) -> Iterator[None]:
    """Seed all generators for the block, then restore the training streams exactly as they were."""
    saved = ckpt.rng_state()
    seed_everything(seed, rank)
    try:
        yield
    finally:
        ckpt.set_rng_state(saved)


def _epoch_batches(batches: BatchSource, epoch: int, skip: int, seed: int, rank: int) -> Iterator[Batch]:
    """Epoch `epoch`'s iterator, with its first `skip` batches consumed (a resumed run continues mid-epoch).

    Creating the iterator (a DataLoader draws its worker seeds here) and skipping happen under seeds that depend only
    on (seed, epoch, rank), so an interrupted and an uninterrupted run see the same batches and the same RNG streams.
    """
    with _isolated_rng(seed + 7919 * (epoch + 1), rank):
        it = iter(batches(epoch))
        for i in range(skip):
            if next(it, None) is None:
                raise RuntimeError(f"epoch {epoch} ended after {i} batches while resuming; the loader yields fewer "
                                   "batches than it announced")
    return it


class _Progress:
    """A tqdm bar with loss, images/s and ETA on a terminal; a log line per log step otherwise (rank 0 only)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.enabled, self.total, self.t0, self.step0 = enabled, total, time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, m: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.1f}", refresh=False)
            return
        rate = (step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        log.info("step %d/%d (%.0f%%) loss %.4f (itc %.4f, ml %.4f) lr %.3g grad_norm %.3g %.1f images/s eta %s",
                 step, self.total, 100.0 * step / max(self.total, 1), m["loss"], m["loss_itc"], m["loss_ml"],
                 m["lr"], m["grad_norm"], m["images_per_s"], eta_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(model: nn.Module, loss_fn: Callable[..., dict[str, torch.Tensor]], batches: BatchSource, *,
        cfg: TrainConfig, steps_per_epoch: int, info: DistInfo, device: torch.device, seed: int,
        checkpoint_dir: str | Path | None = None, run_config: dict[str, Any] | None = None,
        log_fn: LogFn | None = None, progress: bool = True,
        clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train `model` as the reference recipe does; resume from `checkpoint_dir` when it holds a checkpoint.

    Args:
        model: the unwrapped model; `model(pixels, tokens)` returns the loss inputs and `model.logit_scales()` the
            clamped (scale, multi-label scale) pair.
        loss_fn: `loss_fn(outputs, scale, ml_scale, rank=, world_size=) -> {"loss", "loss_itc", "loss_ml"}`.
        batches: epoch -> iterable of `(pixels, tokens)` micro-batches (at least `steps_per_epoch * grad_accum`).
        cfg: the `train` section.
        steps_per_epoch: optimizer steps per epoch (batches per rank // grad_accum).
        info: this process's rank and world.
        device: where to train.
        seed: `base.seed` (each rank uses seed + rank).
        checkpoint_dir: where checkpoints go (None: no checkpoints, no resumption).
        run_config: the resolved configuration, stored in every checkpoint.
        log_fn: called on rank 0 as `log_fn(step, metrics)` on every log step.
        progress: show the progress bar / log lines on rank 0.
        clock: seconds, monotonic; what the wall-clock budget (`cfg.max_minutes`) and images/s are measured with
            (injected by tests to play a busy or a fast machine).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checked on every log and checkpoint step).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, found {steps_per_epoch} (too few batches for grad_accum "
                         f"{cfg.grad_accum})")
    t_start = clock()
    planned = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else round(cfg.warmup_epochs * steps_per_epoch)
    factor = cfg.lr_factor(info.world_size)
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    model.to(device).train()
    if info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # reference: BN heads use SyncBN in training
    optimizer = build_optimizer(model, cfg.lr * factor, cfg.weight_decay, cfg.optimizer_impl)

    # ---- resume -----------------------------------------------------------------------------------------------
    step, plan_fixed, resumed_from, curve = 0, cfg.max_minutes == 0, None, []
    folder = Path(checkpoint_dir) / "checkpoints" if checkpoint_dir else None
    state = ckpt.load_latest(folder) if folder is not None and cfg.resume else None
    stale = stale_reason(state, run_config)
    if stale:  # nothing to resume: start afresh, keeping the old checkpoints aside (never mixed with the new ones)
        if info.is_main:
            log.warning("not resuming %s: %s; starting afresh (old checkpoints moved to %s_previous)",
                        state["path"], stale, folder)
            ckpt.move_aside(folder)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        # the kernels are this run's choice (train.optimizer_impl): load_state_dict would bring back the checkpoint's
        kernels = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, chosen in zip(optimizer.param_groups, kernels, strict=True):
            group.update(chosen)
        scaler.load_state_dict(state["scaler"])
        step, planned, plan_fixed = state["step"], state["planned_steps"], state["plan_fixed"]
        warmup, curve, resumed_from = state["schedule"]["warmup_steps"], list(state["curve"]), state["step"]
        if state["world_size"] == info.world_size:
            ckpt.set_rng_state(state["rng"][info.rank])
        else:
            log.warning("resuming a %d-process checkpoint with %d processes: the global batch, learning rate and "
                        "data order change", state["world_size"], info.world_size)
            seed_everything(seed + 104729 * step, info.rank)
        if info.is_main:
            log.info("resumed from %s at step %d of %d", state["path"], step, planned)
        del state
    else:
        seed_everything(seed, info.rank)

    seen = all_gather_object(step, info)
    if len(set(seen)) > 1:
        raise RuntimeError(f"the processes resumed from different checkpoints (steps by rank: {seen}); put "
                           f"{checkpoint_dir} on storage every node shares")
    schedule = WarmupCosine(cfg.lr * factor, cfg.min_lr * factor, cfg.warmup_lr * factor, min(warmup, planned),
                            planned)
    # buffers (BatchNorm statistics) synced once at start, then rank-local: the reference's broadcast_buffers=False
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False) if info.distributed else model
    # the towers are compiled one by one (groupvit.model.compile_model: the text trim's host read stays outside the
    # graphs, state-dict names unchanged); compiling the whole DDP module broke its graph there and paid off 4x less
    compile_model(model, cfg.compile)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())

    bar = _Progress(progress and info.is_main, planned, step)
    images_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    window = torch.zeros(3, device=device)  # running sums of (loss, loss_itc, loss_ml) since the last log step
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    window_steps, t_window, last_good, stopped_by_budget = 0, clock(), step, False
    metrics: dict[str, float] = {}
    probe: tuple[int, float] | None = None
    grad_norm = torch.zeros((), device=device)

    def check(stop: bool = False) -> bool:
        """Collective: raise on a non-finite loss on any rank; returns whether any rank asks to stop."""
        flags = torch.stack([bad.float(), torch.tensor(float(stop), device=device)])
        flags = all_reduce_max(flags, info).tolist()
        if flags[0] > 0:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite between steps {last_good} and {step}; stopping. The last good "
                f"checkpoint is kept (resume continues from it). Try a lower train.lr, precision fp32 or a smaller "
                f"train.clip_grad")
        return flags[1] > 0

    def save(final: bool = False) -> None:
        rngs = all_gather_object(ckpt.rng_state(), info)
        if not info.is_main or checkpoint_dir is None:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "schedule": schedule.state_dict(), "step": step, "planned_steps": planned, "plan_fixed": plan_fixed,
                 "world_size": info.world_size, "rng": rngs, "curve": curve, "config": run_config or {}}
        try:
            ckpt.save_checkpoint(Path(checkpoint_dir) / "checkpoints", step, state, keep=cfg.keep_checkpoints)
        except Exception as e:
            if final:
                raise
            log.error("writing the checkpoint of step %d failed (%s); the previous checkpoint is kept, training "
                      "continues", step, e)

    try:
        while step < planned:
            epoch = step // steps_per_epoch
            it = _epoch_batches(batches, epoch, (step - epoch * steps_per_epoch) * cfg.grad_accum, seed, info.rank)
            while step < planned and step < (epoch + 1) * steps_per_epoch:
                lr = schedule.apply(optimizer, step)
                for micro in range(cfg.grad_accum):
                    batch = next(it, None)
                    if batch is None:
                        raise RuntimeError(f"the loader of epoch {epoch} ended early; expected "
                                           f"{steps_per_epoch * cfg.grad_accum} batches per epoch on every rank")
                    pixels = batch[0].to(device, non_blocking=True)
                    tokens = batch[1].to(device, non_blocking=True)
                    last = micro == cfg.grad_accum - 1
                    # DDP all-reduces gradients only on the last micro-batch of a step
                    sync = contextlib.nullcontext() if last or not info.distributed else ddp.no_sync()
                    with sync:
                        with autocast:
                            outputs = ddp(pixels, tokens)
                            scale, ml_scale = model.logit_scales()
                            losses = loss_fn(outputs, scale, ml_scale, rank=info.rank, world_size=info.world_size)
                        scaler.scale(losses["loss"] / cfg.grad_accum).backward()
                    parts = [losses["loss"], losses.get("loss_itc", losses["loss"]),
                             losses.get("loss_ml", torch.zeros((), device=device))]
                    values = torch.stack([p.detach().float().reshape(()) for p in parts])
                    window += values / cfg.grad_accum
                    bad |= ~torch.isfinite(values[0])
                scaler.unscale_(optimizer)
                # foreach: a few multi-tensor kernels instead of one norm per parameter (bit-identical on CPU)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.clip_grad if cfg.clip_grad > 0 else float("inf"),
                                                           foreach=cfg.optimizer_impl != "for_loop")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                bar.update(step)

                # fit the plan into the wall-clock budget: time a few steps after the warm-up, then fix the total
                if not plan_fixed and probe is None and step == _BUDGET_PROBE_AFTER:
                    bad.item()  # sync once so the timer starts after the warm-up steps really finished
                    probe = (step, clock())
                elif not plan_fixed and probe is not None and step == probe[0] + _BUDGET_PROBE_STEPS:
                    bad.item()
                    per_step = (clock() - probe[1]) / _BUDGET_PROBE_STEPS
                    left = cfg.max_minutes * 60 - (clock() - t_start)
                    fit_steps = step + max(0, int(_BUDGET_SHARE * left / per_step))
                    planned = broadcast_object(min(planned, max(step, fit_steps)), info)
                    # a shortened plan keeps a cosine phase: warm-up at most a fifth of it
                    warmup = min(warmup, max(1, planned // 5)) if planned < schedule.total_steps else warmup
                    plan_fixed, bar.total = True, planned
                    schedule = WarmupCosine(schedule.base_lr, schedule.min_lr, schedule.warmup_lr,
                                            min(warmup, planned), planned)
                    if info.is_main:
                        log.info("time budget %.1f min at %.3f s/step: planning %d steps (%d warm-up)",
                                 cfg.max_minutes, per_step, planned, schedule.warmup_steps)
                if not plan_fixed and step >= planned:
                    plan_fixed = True  # finished before the probe ended: the plan was the full length

                is_log = step % cfg.log_every == 0 or step == planned
                is_ckpt = plan_fixed and (step % cfg.ckpt_every == 0 or step == planned)
                if is_log or is_ckpt:
                    # a hard stop only once the plan is fixed, so every checkpoint carries the final plan
                    over_budget = (plan_fixed and cfg.max_minutes > 0 and step < planned
                                   and clock() - t_start > cfg.max_minutes * 60)
                    stop = check(stop=over_budget)
                    last_good = step
                    if is_log or stop:
                        now = clock()
                        means = all_reduce_mean(window / max(window_steps, 1), info).tolist()
                        scale, ml_scale = (float(s.detach()) for s in model.logit_scales())
                        metrics = {"loss": means[0], "loss_itc": means[1], "loss_ml": means[2], "lr": lr,
                                   "logit_scale": scale, "ml_logit_scale": ml_scale,
                                   "grad_norm": float(grad_norm),
                                   "images_per_s": images_per_step * window_steps / max(now - t_window, 1e-9),
                                   "epoch": step / steps_per_epoch}
                        curve.append({"step": step, "loss": means[0], "loss_itc": means[1], "loss_ml": means[2],
                                      "lr": lr})
                        window.zero_()
                        window_steps, t_window = 0, now
                        bar.report(step, metrics)
                        if log_fn is not None and info.is_main:
                            log_fn(step, metrics)
                    if is_ckpt or stop:
                        save(final=step == planned)
                    if stop:
                        stopped_by_budget = True
                        if info.is_main:
                            log.warning("wall-clock budget of %.1f min reached at step %d of %d; checkpoint saved, "
                                        "a rerun continues to the planned end", cfg.max_minutes, step, planned)
                        break
            if stopped_by_budget:
                break
    finally:
        bar.close()

    wall = clock() - t_start
    done = step - (resumed_from or 0)
    return TrainResult(step=step, planned_steps=planned, final_loss=metrics.get("loss", float("nan")),
                       images_per_s=images_per_step * done / max(wall, 1e-9), wall_s=wall,
                       stopped_by_budget=stopped_by_budget, resumed_from=resumed_from, curve=curve)

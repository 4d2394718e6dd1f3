"""Where the default pipeline's training step spends its time: `torch.profiler` over the real loop, per op family.

The model, loss and `train` settings are those of params.yaml (the embedded default: the tiny-sized GroupViT of the
`model` section, batch 64, bf16 autocast, InfoNCE + multi-label loss over the caption and 3 prompts, clipping,
AdamW), run by `groupvit.training.fit` on in-memory batches (the loader is `loader_throughput`'s job). Warm-up steps
first (not profiled), then `--steps` profiled ones. Self CPU time of every aten op is summed into families (GEMMs,
attention and softmax, normalisation, element-wise, reductions, copies and layout, the optimizer, random numbers,
the rest), per step, and split by phase (forward, backward, optimizer: the op's callers); the count of ops per step
says how launch-bound the step is, and `_local_scalar_dense` calls are host syncs (`.item()`).

    .venv/bin/python benchmarks/profile_step.py --steps 20
    .venv/bin/python benchmarks/profile_step.py --quick          # 2 steps: checks the script

Figures: benchmarks/results/profile_step.json; the profiler's own table (top ops by self CPU time) beside it in
benchmarks/results/profile_step.txt.
"""
from __future__ import annotations

import argparse
import collections
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from _results import Run, parse_args

from groupvit.atomic import atomic_write
from groupvit.config import load_section

QUICK = {"steps": 2, "warmup": 1}
# aten op name -> family; the first matching prefix wins (self time: the op's own work, callees excluded)
FAMILIES = (
    ("GEMM (mm, bmm, addmm)", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_mkldnn", "aten::matmul",
                               "aten::linear", "aten::addmv", "aten::dot")),
    ("attention and softmax", ("aten::_softmax", "aten::softmax", "aten::_log_softmax", "aten::_scaled_dot_product",
                               "aten::_flash_attention", "aten::_safe_softmax", "aten::log_softmax")),
    ("normalisation", ("aten::native_layer_norm", "aten::layer_norm", "aten::native_batch_norm",
                       "aten::batch_norm", "aten::_batch_norm")),
    ("optimizer kernels and clipping", ("aten::_fused_adamw", "aten::_foreach", "aten::_amp_foreach", "aten::lerp",
                                        "aten::addcdiv", "aten::addcmul", "aten::linalg_vector_norm", "aten::norm",
                                        "aten::clamp", "aten::_local_scalar_dense", "aten::item")),
    ("random numbers", ("aten::uniform_", "aten::exponential_", "aten::bernoulli", "aten::normal_", "aten::rand")),
    ("reductions", ("aten::sum", "aten::mean", "aten::max", "aten::amax", "aten::argmax", "aten::min",
                    "aten::logsumexp", "aten::topk", "aten::sort")),
    ("copies and layout", ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::_to_copy",
                           "aten::to", "aten::index", "aten::gather", "aten::scatter", "aten::stack", "aten::embedding",
                           "aten::repeat", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::ones",
                           "aten::new_", "aten::_unsafe", "aten::masked_fill", "aten::narrow_copy", "aten::index_add",
                           "aten::pad", "aten::constant_pad")),
    ("element-wise (add, mul, gelu, ...)", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::neg",
                                            "aten::exp", "aten::log", "aten::pow", "aten::where", "aten::gelu",
                                            "aten::sqrt", "aten::rsqrt", "aten::tanh", "aten::sigmoid", "aten::abs",
                                            "aten::eq", "aten::ne", "aten::gt", "aten::lt", "aten::ge", "aten::le",
                                            "aten::reciprocal", "aten::threshold", "aten::silu", "aten::erf",
                                            "aten::logical", "aten::bitwise")),
)
OTHER = "other (autograd engine, views, Python)"


def family(name: str) -> str:
    """The family of aten op `name` (autograd nodes are not aten ops: their aten callees count in their families)."""
    for label, prefixes in FAMILIES:
        if name.startswith(prefixes):
            return label
    return OTHER


def phase(event) -> str:  # noqa: ANN001 (a torch.autograd.profiler_util.FunctionEvent)
    """forward (model, loss, clipping and the loop's own ops), backward (under an autograd engine node) or optimizer
    (under torch's `Optimizer.step#...` annotation), from the op's callers."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        if parent.name.startswith("autograd::engine"):
            return "backward"
        parent = parent.cpu_parent
    return "forward"


def build(params: Path, batch: int | None):
    """(model, loss, TrainConfig, pixels, tokens) of params.yaml's `model`, `data` and `train` sections."""
    from model_throughput import make_inputs  # captions of 10-30 tokens and 3 prompts of 8-10, as there

    from groupvit.data.config import DataConfig
    from groupvit.losses import GroupViTLoss
    from groupvit.model import GroupViT, ModelConfig
    from groupvit.training import TrainConfig

    model_cfg = load_section(ModelConfig, params, "model")
    data_cfg = load_section(DataConfig, params, "data")
    train_cfg = load_section(TrainConfig, params, "train")
    batch = batch or train_cfg.batch_size
    torch.manual_seed(0)
    model = GroupViT(model_cfg)
    loss = GroupViTLoss(multi_label=data_cfg.multi_label > 0, patch_weight=model_cfg.multi_label_patches)
    pixels, tokens = make_inputs(model_cfg, batch)
    tokens = tokens[:, :1 + data_cfg.multi_label]  # [B, 1+K, L]: the caption and K prompted nouns
    return model, loss, replace(train_cfg, batch_size=batch), pixels, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="the model, data and train sections (default params.yaml)")
    p.add_argument("--batch", type=int, default=0, help="images per step (default train.batch_size)")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before profiling (allocator, threads, autotuning)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--top", type=int, default=40, help="rows of the profiler table written beside the results")
    args = parse_args(p, QUICK, argv)
    record = Run("profile_step", args)
    torch.set_num_threads(args.threads)
    from groupvit.training import fit
    from groupvit.training.distributed import DistInfo

    model, loss_fn, cfg, pixels, tokens = build(Path(args.params), args.batch or None)

    def run(steps: int) -> float:
        train_cfg = replace(cfg, steps=steps, warmup_steps=1, ckpt_every=steps, max_minutes=0, compile=False)
        t0 = time.perf_counter()
        fit(model, loss_fn, lambda epoch: [(pixels, tokens)] * steps, cfg=train_cfg, steps_per_epoch=steps,
            info=DistInfo(), device=torch.device("cpu"), seed=0, progress=False)
        return time.perf_counter() - t0

    run(args.warmup)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seconds = run(args.steps)
    events = prof.key_averages()
    self_us: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    phase_us: dict[str, float] = collections.defaultdict(float)
    total_calls = syncs = 0
    for e in prof.events():  # every aten op once, with its own (self) time and its caller chain
        if not e.name.startswith("aten::"):
            continue
        self_us[family(e.name)] += e.self_cpu_time_total
        calls[family(e.name)] += 1
        phase_us[phase(e)] += e.self_cpu_time_total
        total_calls += 1
        syncs += e.name == "aten::_local_scalar_dense"
    total = sum(self_us.values()) or 1.0
    rows = [{"family": name, "ms_per_step": us / 1e3 / args.steps, "share": us / total,
             "ops_per_step": calls[name] / args.steps}
            for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])]
    figures = {"step_ms": seconds / args.steps * 1e3, "images_per_s": cfg.batch_size * args.steps / seconds,
               "aten_ops_per_step": total_calls / args.steps, "host_syncs_per_step": syncs / args.steps,
               "batch": cfg.batch_size, "precision": cfg.precision,
               **{f"{name}_share": phase_us[name] / total for name in ("forward", "backward", "optimizer")}}
    print(f"{args.steps} profiled steps of batch {cfg.batch_size} ({cfg.precision}, {args.threads} threads): "
          f"{figures['step_ms']:.0f} ms/step (with the profiler), {figures['aten_ops_per_step']:.0f} aten ops/step, "
          f"{figures['host_syncs_per_step']:.2f} host syncs/step; forward {figures['forward_share']:.0%}, backward "
          f"{figures['backward_share']:.0%}, optimizer {figures['optimizer_share']:.0%} of the ops' self time")
    for r in rows:
        print(f"  {r['family']:<40} {r['ms_per_step']:8.1f} ms/step {r['share']:6.1%} {r['ops_per_step']:7.0f} ops")
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "profile_step.txt", f"# {record.command}\n# {args.steps} profiled steps\n{table}\n")
    record.write(rows, figures, table_file="benchmarks/results/profile_step.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

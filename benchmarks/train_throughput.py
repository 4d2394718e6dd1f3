"""Training throughput (images/s) and MFU of the real training loop, at 1 and 2 processes, side by side.

Each variant runs `groupvit.training.fit` (DDP over gloo/NCCL when 2 processes, autocast, clipping, AdamW, per-step
schedule) on in-memory batches already on the device, so the figures measure model + optimizer + communication and
not the data loader. Each run is `--steps` burn-in steps (allocation, autotuning, first-use imports) followed by
`--steps` timed steps; only the timed window counts.

MFU = achieved model FLOPs / peak. Model FLOPs come from `groupvit.model.flops_per_sample` (analytic matmul FLOPs,
forward + backward = 3 x forward, caption + K prompts at the full context length). Peak: on CPU the measured rate of
a large matmul in the run's precision on all cores (processes share the cores, so the peak is the machine's); on
GPUs the dense bf16/fp16 tensor-core peak of the card times the processes (`--peak-tflops` overrides either).

    .venv/bin/python benchmarks/train_throughput.py [--configs tiny gcc_yfcc] [--nprocs 1 2] [--steps 5]
        [--batch tiny=32 gcc_yfcc=4] [--device cpu|cuda] [--precision bf16|fp32|fp16] [--threads N] [--torchrun]
        [--quick]

Figures: benchmarks/results/train_throughput_<device>.json (`benchmarks/_results.py`); `benchmarks/gpu_check.sh`
runs this on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import Run, parse_args

from pipelines.launch import LaunchOptions, launch, run_forwarding_signals, worker_process

ROOT = Path(__file__).resolve().parents[1]
# dense tensor-core peak (bf16/fp16, no sparsity) per GPU, TFLOPS
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                   "V100": 125.0, "4090": 165.0, "3090": 71.0}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured rate of an n x n matmul: the practical peak of this machine (CPU) or card."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def peak_tflops(device: str, precision: str, nproc: int) -> tuple[float, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * nproc, f"{name} datasheet x {nproc}"
        dtype = torch.bfloat16 if precision != "fp32" else torch.float32
        return matmul_peak_tflops(torch.device("cuda"), dtype, 8192) * nproc, f"{name} measured matmul x {nproc}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    torch.set_num_threads(os.cpu_count() or 1)
    return matmul_peak_tflops(torch.device("cpu"), dtype), f"measured {precision} matmul, {os.cpu_count()} cores"


def worker(args: argparse.Namespace) -> None:
    """One process of one variant: train burn-in + timed steps, rank 0 prints a RESULT line."""
    from groupvit.losses import GroupViTLoss
    from groupvit.model import GroupViT, ModelConfig
    from groupvit.training import TrainConfig, fit

    # the train stage's worker set-up: process group, device, threads per process / TF32 and cuDNN autotuning
    with worker_process(120, threads=args.threads, cpu=args.device == "cpu") as (info, device):
        torch.manual_seed(0)
        mcfg = ModelConfig(preset=args.config)
        model = GroupViT(mcfg)
        k = 3 if mcfg.multi_label else 0
        g = torch.Generator(device="cpu").manual_seed(info.rank)
        pixels = torch.randn(args.batch, 3, mcfg.image_size, mcfg.image_size, generator=g).to(device)
        tokens = torch.randint(1, mcfg.vocab_size - 2, (args.batch, 1 + k, mcfg.context_length), generator=g)
        tokens[..., -1] = mcfg.vocab_size - 1  # EOT last: the whole context is computed, as the FLOPs count
        tokens = tokens.to(device)
        steps_per_epoch = 2 * args.steps
        cfg = TrainConfig(steps=2 * args.steps, batch_size=args.batch, precision=args.precision, warmup_steps=1,
                          log_every=args.steps, lr=1e-4, min_lr=1e-6, compile=args.compile, threads=0)
        windows: list[float] = []
        fit(model, GroupViTLoss(multi_label=bool(k)), lambda epoch: [(pixels, tokens)] * steps_per_epoch,
            cfg=cfg, steps_per_epoch=steps_per_epoch, info=info, device=device, seed=0, progress=False,
            log_fn=lambda step, m: windows.append(m["images_per_s"]))
        if torch.distributed.is_initialized():  # under torchrun: prove the process group (NCCL on GPUs) works
            probe = torch.ones(1, device=device)
            torch.distributed.all_reduce(probe)
            assert probe.item() == info.world_size, f"all_reduce gave {probe.item()}, expected {info.world_size}"
        if info.is_main:
            from groupvit.model import flops_per_sample

            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
            print("RESULT " + json.dumps({"images_per_s": windows[-1], "k": k, "backend": backend,
                                          "flops_per_sample": flops_per_sample(mcfg, k, train=True)}), flush=True)


def run_variant(args: argparse.Namespace, config: str, nproc: int, batch: int) -> dict:
    inner = ["--worker", f"--config={config}", f"--batch={batch}", f"--steps={args.steps}", f"--device={args.device}",
             f"--precision={args.precision}", f"--threads={args.threads}"] + (["--compile"] if args.compile else [])
    script = str(Path(__file__).resolve())
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as out:  # the workers' output, shown only when the variant fails
        if nproc > 1 or args.torchrun:  # the train stage's launcher: torchrun, signals forwarded
            rc = launch(LaunchOptions(nproc=nproc), [script, *inner], env=env, cwd=str(ROOT), output=out)
        else:
            rc = run_forwarding_signals([sys.executable, script, *inner], env=env, cwd=str(ROOT), output=out)
        out.seek(0)
        text = out.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        sys.exit(f"{config} x{nproc} failed (exit {rc}):\n{text[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


QUICK = {"configs": ["tiny"], "steps": 2, "batch": ["tiny=8"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "gcc_yfcc"])
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", nargs="+", default=["tiny=32", "gcc_yfcc=4"], help="images per process, per config")
    p.add_argument("--steps", type=int, default=5, help="burn-in steps, then as many timed steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--torchrun", action="store_true", help="run 1-process variants under torchrun too (NCCL check)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: cores / processes)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak of the whole run (default: see above)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = parse_args(p, QUICK)
    if args.worker:
        args.batch = int(args.batch[0])
        return worker(args)
    record = Run(f"train_throughput_{args.device}", args)
    rows = []

    batches = dict(item.split("=") for item in args.batch)
    print(f"device {args.device}, precision {args.precision}, {args.steps} burn-in + {args.steps} timed steps, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"threads per process: {args.threads or 'cores / processes'}"
          + (", compiled" if args.compile else ""))
    header = (f"{'config':<9} {'procs':>5} {'batch/proc':>10} {'images/s':>9} {'per proc':>8} {'GFLOP/img':>9} "
              f"{'TFLOPS':>7} {'peak':>7} {'MFU':>6} {'vs 1 proc':>9}")
    print(header)
    for config in args.configs:
        base = None
        for nproc in args.nprocs:
            r = run_variant(args, config, nproc, int(batches.get(config, 8)))
            peak, peak_src = ((args.peak_tflops, "given") if args.peak_tflops
                              else peak_tflops(args.device, args.precision, nproc))
            achieved = r["images_per_s"] * r["flops_per_sample"] / 1e12
            base = base or r["images_per_s"]
            print(f"{config:<9} {nproc:>5} {int(batches.get(config, 8)):>10} {r['images_per_s']:>9.2f} "
                  f"{r['images_per_s'] / nproc:>8.2f} {r['flops_per_sample'] / 1e9:>9.2f} {achieved:>7.3f} "
                  f"{peak:>7.2f} {achieved / peak:>6.1%} {r['images_per_s'] / base:>8.2f}x   "
                  f"(process group: {r['backend']}; peak: {peak_src})",
                  flush=True)
            rows.append({"config": config, "procs": nproc, "batch_per_proc": int(batches.get(config, 8)),
                         "images_per_s": r["images_per_s"], "images_per_s_per_proc": r["images_per_s"] / nproc,
                         "gflop_per_image": r["flops_per_sample"] / 1e9, "tflops": achieved, "peak_tflops": peak,
                         "mfu": achieved / peak, "vs_1_proc": r["images_per_s"] / base, "process_group": r["backend"],
                         "peak_source": peak_src})
    record.write(rows)


if __name__ == "__main__":
    main()

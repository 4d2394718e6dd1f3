"""Training and inference throughput of GroupViT vs the Hugging Face GroupViTModel at the same config, in one run.

Variants (same batch, thread count, precision and inputs):
  ours/full        forward, InfoNCE + multi-label loss (caption + K=3 prompted texts per image), backward, AdamW
  ours/caption     the same step with the caption-only InfoNCE (the work the Hugging Face model can do)
  hf/caption       GroupViTModel(input_ids, pixel_values, return_loss=True), backward, AdamW
  ours/infer, hf/infer   eval-mode image + caption embeddings under no_grad
  hf-trim/...      (optional) the HF model fed ids cut to the batch's longest text (CLIPTokenizer padding=True)
  ours-recompute/...  (optional) ours with `mlp_recompute_act` (each MLP's GELU output recomputed in backward)
  ours-compiled/...  (optional) our variant with the towers compiled (`compile_model`, inductor); compile time is
                   paid in the warm-up steps and not timed (`--compile` compiles every ours variant instead)

Ids are in the official format (SOT ... EOT, zero padded to the context length): captions of 10-30 tokens, prompts
of 8-10 (like "a photo of a dog."). Timing interleaves the variants round by round in one process (fair on a shared
machine; median step); peak memory comes from one fresh process per variant. Prints images/s, ratios vs HF, peak
resident memory, and MFU = analytic FLOPs actually executed (`flops_per_sample`, with the text at the length each
model runs) / a matmul peak measured here at the same precision and thread count. AdamW is the fused CPU kernel
for both models.

    .venv/bin/python benchmarks/model_throughput.py --preset tiny --batch 256
    .venv/bin/python benchmarks/model_throughput.py --preset gcc_yfcc --batch 16 --rounds 6
    .venv/bin/python benchmarks/model_throughput.py --quick     # tiny, batch 16, 2 rounds: checks the script

Figures: benchmarks/results/model_throughput_<preset>.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _results import Run, parse_args

from groupvit.losses import GroupViTLoss
from groupvit.model import GroupViT, ModelConfig, autocast, compile_model, flops_per_sample

SOT, EOT = 49406, 49407
K_PROMPTS = 3
VARIANTS = ("ours/full", "ours/caption", "hf/caption", "ours/infer", "hf/infer")
ALL_VARIANTS = VARIANTS + ("hf-trim/caption", "hf-trim/infer", "ours-compiled/full", "ours-compiled/caption",
                           "ours-compiled/infer", "ours-recompute/full", "ours-recompute/caption")


def make_inputs(cfg: ModelConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [B, 3, S, S], tokens [B, 1+K, L]: captions of 10-30 tokens, prompts of 8-10, zero padded."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.zeros(batch, 1 + K_PROMPTS, cfg.context_length, dtype=torch.long)
    for b in range(batch):
        for j in range(1 + K_PROMPTS):
            lo, hi = (10, 30) if j == 0 else (8, 10)
            n = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), cfg.context_length)
            tokens[b, j, :n] = torch.randint(1, SOT, (n,), generator=g)
            tokens[b, j, 0], tokens[b, j, n - 1] = SOT, EOT
    return pixels, tokens


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """The Hugging Face GroupViTModel with our config's numbers (vision heads: one value for all stages)."""
    from transformers import GroupViTConfig, GroupViTModel

    if len(set(cfg.num_heads)) != 1:
        raise SystemExit("the Hugging Face model needs the same number of heads in every stage")
    vision = dict(hidden_size=cfg.embed_dim, intermediate_size=int(cfg.mlp_ratio * cfg.embed_dim),
                  depths=list(cfg.depths), num_hidden_layers=sum(cfg.depths),
                  num_group_tokens=list(cfg.num_group_tokens),
                  num_output_groups=list(cfg.num_output_groups) + [cfg.num_output_groups[-1]],
                  num_attention_heads=cfg.num_heads[0], image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length)
    return GroupViTModel(GroupViTConfig(text_config=text, vision_config=vision, projection_dim=cfg.output_dim,
                                        projection_intermediate_dim=cfg.proj_hidden_dim))


def matmul_peak(precision: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul at this precision and thread count."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) of this process in MiB. (Not ru_maxrss: Linux carries it over
    fork + exec, so a child would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_variant(variant: str, args: argparse.Namespace) -> tuple[Callable[[], None], int, float]:
    """(one step of the variant, text length it runs, executed FLOPs per sample)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.preset, grad_checkpointing=args.grad_checkpointing, attn_impl=args.attn_impl,
                      mlp_recompute_act=variant.startswith("ours-recompute/"))
    pixels, tokens = make_inputs(cfg, args.batch)
    who, what = variant.split("/")
    train = what != "infer"
    if what != "full":
        tokens = tokens[:, :1]
    longest = int(tokens.argmax(-1).max()) + 1
    if who in ("ours", "ours-compiled", "ours-recompute"):
        who, compiled = "ours", args.compile or who == "ours-compiled"
        model = GroupViT(cfg)
        compile_model(model, compiled)
        loss_fn = GroupViTLoss(multi_label=what == "full")
        text_len = longest if cfg.trim_text_padding else cfg.context_length
    else:
        model = hf_model(cfg)
        text_len = longest if who == "hf-trim" else cfg.context_length  # ids cut like padding="longest"
        tokens = tokens[..., :text_len]
    model.train(train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True) if train else None

    def step() -> None:
        with torch.set_grad_enabled(train), autocast(args.precision):
            if who == "ours" and train:
                out = model(pixels, tokens)
                loss = loss_fn(out, *model.logit_scales())["loss"]
            elif who == "ours":
                model.encode_image(pixels), model.encode_text(tokens[:, 0])
            else:
                out = model(input_ids=tokens[:, 0], pixel_values=pixels, return_loss=train)
                loss = out.loss
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    k = K_PROMPTS if what == "full" else 0
    return step, text_len, flops_per_sample(cfg, k, train, text_tokens=text_len)


def peak_memory(variant: str, args: argparse.Namespace) -> dict:
    """Peak resident memory of a fresh process running the variant (transformers imported in every worker, so
    the interpreter baseline is the same), and the increment over the process before the model was built."""
    import transformers  # noqa: F401  (equal baseline for every variant)

    base = rss_mib()
    step, _, _ = build_variant(variant, args)
    for _ in range(3):
        step()
    peak = rss_mib("VmHWM")
    return {"peak_rss_mib": peak, "increment_mib": peak - base}


QUICK = {"preset": "tiny", "batch": 16, "rounds": 2, "warmup": 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "gcc_yfcc"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=8, help="timed rounds; each runs one step of every variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--compile", action="store_true", help="torch.compile our model (HF stays eager)")
    p.add_argument("--grad-checkpointing", action="store_true", help="our model only")
    p.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "eager"), help="our model only")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(p, QUICK, argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(peak_memory(args.memory_worker, args)))
        return 0
    record = Run(f"model_throughput_{args.preset}", args)

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:  # an unknown "ours-..." name would otherwise time the HF model under our label
        p.error(f"--variants: unknown {', '.join(unknown)}; expected a comma list of {', '.join(ALL_VARIANTS)}")
    peak = matmul_peak(args.precision)
    print(f"preset {args.preset}, batch {args.batch}, {args.threads} threads, {args.precision}, "
          f"compile {args.compile}, grad ckpt {args.grad_checkpointing}; {args.warmup} warm-up steps, "
          f"{args.rounds} interleaved rounds (median step); measured {args.precision} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    # Timing: all variants in this process, interleaved round by round, so load changes on a shared machine hit
    # every variant alike; the median step time ignores outliers.
    built = {v: build_variant(v, args) for v in variants}
    for step, _, _ in built.values():
        for _ in range(args.warmup):
            step()
    meta = {v: (text_len, flops) for v, (_, text_len, flops) in built.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, (step, _, _) in built.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    del built
    results = {}
    for v in variants:
        images_per_s = args.batch / statistics.median(times[v])
        text_len, flops = meta[v]
        results[v] = {"images_per_s": images_per_s, "text_len": text_len, "mfu": images_per_s * flops / peak}
        print(f"{v:14s} {images_per_s:9.1f} images/s  MFU {100 * results[v]['mfu']:5.1f}%  text len {text_len:3d}",
              flush=True)
    for v in variants:
        r = results[v]
        if not args.no_memory:
            cmd = [sys.executable, __file__, "--memory-worker", v] + argv
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{v}: memory worker failed\n{done.stderr[-2000:]}")
            else:
                r.update(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{v:14s} peak RSS {r.get('peak_rss_mib', float('nan')):7.0f} MiB "
                  f"(+{r.get('increment_mib', float('nan')):.0f} over the process before the model)", flush=True)
    figures = {"matmul_peak_gflops": peak / 1e9}
    for mine, theirs in (("ours/caption", "hf/caption"), ("ours/caption", "hf-trim/caption"),
                         ("ours/infer", "hf/infer"), ("ours-compiled/caption", "hf/caption"),
                         ("ours-compiled/infer", "hf/infer"), ("ours-compiled/full", "ours/full"),
                         ("ours-recompute/caption", "hf/caption"), ("ours-recompute/caption", "ours/caption")):
        if mine in results and theirs in results:
            a, b = results[mine], results[theirs]
            mem = ""
            figures[f"speed {mine} / {theirs}"] = a["images_per_s"] / b["images_per_s"]
            if "peak_rss_mib" in a and "peak_rss_mib" in b:
                mem = (f", peak memory {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x "
                       f"(increment {a['increment_mib'] / b['increment_mib']:.2f}x)")
                figures[f"peak memory {mine} / {theirs}"] = a["peak_rss_mib"] / b["peak_rss_mib"]
                figures[f"memory increment {mine} / {theirs}"] = a["increment_mib"] / b["increment_mib"]
            print(f"{mine} vs {theirs}: speed {a['images_per_s'] / b['images_per_s']:.2f}x{mem}")
    record.write([{"variant": v, **r} for v, r in results.items()], figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

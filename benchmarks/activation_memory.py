"""What one training step keeps for backward: the tensors autograd saved, by the op that saved them and their dtype.

    .venv/bin/python benchmarks/activation_memory.py --preset gcc_yfcc --batch 16 [--variant caption|full] [--quick]

One forward (and the loss) of our GroupViT in training mode under the training precision, then a walk over the
autograd graph from the loss: every node's `_saved_*` tensors, counted once per storage (a tensor saved by two ops,
or a weight's bf16 cast shared by its uses, is counted for the first op met), grouped by node type (`AddmmBackward0`:
a matmul's inputs, `GeluBackward0`: the GELU input, `SoftmaxBackward0`: attention probabilities...) and dtype.
Parameters themselves are left out (they exist anyway); their bf16 casts under autocast are counted. The peak RSS of
`model_throughput.py` is this plus weights, gradients, AdamW state and the allocator's slack; this says which part of
the activations a lever would remove.

Figures: benchmarks/results/activation_memory_<preset>.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from _results import Run, parse_args
from model_throughput import K_PROMPTS, make_inputs

from groupvit.losses import GroupViTLoss
from groupvit.model import GroupViT, ModelConfig, autocast


def saved_tensors(root: torch.autograd.graph.Node, params: set[int]) -> dict[tuple[str, str], int]:
    """Bytes saved for backward per (node type, dtype), each storage once, parameters left out."""
    seen_nodes, seen_storage = set(), set()
    totals: dict[tuple[str, str], int] = defaultdict(int)
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed or not a tensor attribute on this build
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if not isinstance(t, torch.Tensor) or t.numel() == 0:
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in seen_storage or key in params:
                    continue
                seen_storage.add(key)
                totals[(type(node).__name__, str(t.dtype).removeprefix("torch."))] += storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gcc_yfcc", choices=("tiny", "gcc_yfcc"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--variant", default="caption", choices=("caption", "full"),
                   help="caption-only InfoNCE (the Hugging Face comparison) or + the multi-label loss")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--top", type=int, default=12, help="rows shown (the rest summed in one row)")
    args = parse_args(p, {"preset": "tiny", "batch": 8}, argv)
    run = Run(f"activation_memory_{args.preset}", args)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.preset)
    model = GroupViT(cfg).train()
    pixels, tokens = make_inputs(cfg, args.batch)
    if args.variant == "caption":
        tokens = tokens[:, :1]
    with autocast(args.precision):
        out = model(pixels, tokens)
        loss = GroupViTLoss(multi_label=args.variant == "full")(out, *model.logit_scales())["loss"]
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    totals = saved_tensors(loss.grad_fn, params)
    whole = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [{"saved_by": op, "dtype": dtype, "mib": b / 2**20, "share": b / whole} for (op, dtype), b in ranked]
    shown = rows[:args.top]
    if len(rows) > args.top:
        rest = sum(r["share"] for r in rows[args.top:])
        shown.append({"saved_by": f"({len(rows) - args.top} more)", "dtype": "", "mib": rest * whole / 2**20,
                      "share": rest})
    by_dtype: dict[str, float] = defaultdict(float)
    for r in rows:
        by_dtype[r["dtype"]] += r["mib"]
    print(f"{args.preset}, batch {args.batch}, {args.variant}{'' if args.variant == 'caption' else f' (K={K_PROMPTS})'}"
          f", {args.precision}: {whole / 2**20:.1f} MiB saved for backward")
    for r in shown:
        print(f"  {r['saved_by']:<36} {r['dtype']:<9} {r['mib']:8.1f} MiB  {r['share']:6.1%}")
    figures = {"saved_mib": whole / 2**20, **{f"saved_mib_{d}": v for d, v in sorted(by_dtype.items())}}
    run.write(shown, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

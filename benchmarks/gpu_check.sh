#!/usr/bin/env bash
# GPU check: a few hundred real training steps on CUDA through torchrun + NCCL; prints images/s and MFU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make install`; ~3-5 min on one H200
#
# 1. The training loop on the released architecture (gcc_yfcc, batch 256 per GPU like the reference) and the tiny
#    preset: 100 burn-in + 100 timed steps each, one process per GPU under torchrun (NCCL process group checked with
#    an all_reduce), bf16 autocast, fused AdamW; in-memory batches, so the loader is not measured. Its figures go to
#    benchmarks/results/train_throughput_cuda.json (shown by docs/benchmarks.md after `make docs`).
# 2. The `groupvit train` stage end to end on CUDA: 2048 synthetic 64 px scenes written as webdataset shards, the real
#    loader (4 workers), 300 steps of the tiny preset under torchrun/NCCL, checkpoints, final model, MLflow (sqlite in
#    a temporary folder); prints its images/s and MFU from metrics/train.json.
# Nothing outside the temporary folder is written; the network is never used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (a CPU-only build, or no driver); install the "
             f"CUDA build of the same torch version into .venv and rerun")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}, NCCL {torch.cuda.nccl.version()}")
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. training loop throughput and MFU (torchrun, NCCL, $NGPU process(es))"
"$PY" benchmarks/train_throughput.py --device cuda --precision bf16 --torchrun --nprocs "$NGPU" --steps 100 \
    --configs gcc_yfcc tiny --batch gcc_yfcc=256 tiny=512

echo "== 2. groupvit train on CUDA: real loader, checkpoints, MLflow"
WORK=$(mktemp -d -t groupvit-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd, webdataset as wds, yaml
from groupvit.synth import CaptionStyle, WorldSpec, write_world

work = Path(sys.argv[1])
write_world(work / "synth", WorldSpec(image_size=64), CaptionStyle(), seed=0,
            counts={"train": 2048, "val": 0, "test": 0}, url_base="http://127.0.0.1:1", workers=1)
urls = pd.read_parquet(work / "synth/train/urls.parquet")
labels = pd.read_parquet(work / "synth/train/labels.parquet").set_index("key")["categories"]
(work / "shards").mkdir(), (work / "nouns").mkdir()
for shard in range(8):  # category names stand in for the spaCy nouns
    rows = urls.iloc[shard * 256:(shard + 1) * 256]
    with wds.TarWriter(str(work / f"shards/{shard:05d}.tar"), mtime=0) as tar:
        for r in rows.itertuples():
            tar.write({"__key__": r.key, "jpg": (work / f"synth/train/images/{r.key}.jpg").read_bytes(),
                       "txt": r.caption})
    (work / f"nouns/{shard:05d}.json").write_text(json.dumps({r.key: list(labels[r.key]) for r in rows.itertuples()}))
params = yaml.safe_load(Path("params.yaml").read_text())
params["model"] = {"preset": "tiny"}
params["data"] = {**(params.get("data") or {}), "shards_dir": str(work / "shards"), "nouns_dir": str(work / "nouns"),
                  "image_size": 64, "num_workers": 4, "shuffle_buffer": 1000}
params["train"] = {**params["train"], "steps": 300, "max_minutes": 0.0, "batch_size": 128, "precision": "bf16",
                   "nproc": "auto", "log_every": 50, "ckpt_every": 100, "warmup_steps": 20, "threads": 0}
params["tracking"] = {**(params.get("tracking") or {}), "uri": f"sqlite:///{work / 'mlflow.db'}"}
(work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
EOF
"$PY" -m pipelines.cli train --launcher torchrun --params "$WORK/params.yaml" --train-dir "$WORK/train" \
    --model-dir "$WORK/model" --metrics-dir "$WORK/metrics"
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import torch
from groupvit.model import ModelConfig, flops_per_sample

work = Path(sys.argv[1])
m = json.loads((work / "metrics/train.json").read_text())
flops = flops_per_sample(ModelConfig(preset="tiny"), 3, train=True)
peak = 989e12 * m["world_size"] if "H100" in torch.cuda.get_device_name(0) or "H200" in torch.cuda.get_device_name(0) \
    else float("nan")
print(f"gpu_check: stage ran {m['steps']} steps on {m['world_size']} GPU(s), {m['images_per_s']:.0f} images/s over the "
      f"whole run (start-up, loader and checkpoints included), MFU {m['images_per_s'] * flops / peak:.2%} "
      f"(tiny preset, {flops / 1e9:.2f} GFLOP per image); final loss {m['final_loss']:.3f}")
assert (work / "model/model.safetensors").is_file() and (work / "train/checkpoints/latest").is_file()
print("gpu_check: OK")
EOF

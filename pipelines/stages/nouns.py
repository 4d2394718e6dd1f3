"""`groupvit nouns`: spaCy candidate words of every caption, one sidecar per shard (training never runs spaCy).

DVC stage (for dvc.yaml; after `download`):
    cmd:     groupvit nouns
    deps:    data/shards, groupvit/data/config.py, groupvit/data/nouns.py, groupvit/atomic.py, pipelines/stages/nouns.py
    params:  nouns (whole section)
    outs:    data/nouns    (NNNNN.json per shard NNNNN.tar, resolved_config.yaml)
    metrics: metrics/nouns.json (cache: false)
"""
from __future__ import annotations

import json
from pathlib import Path

from groupvit.atomic import atomic_write
from groupvit.config import save_resolved
from groupvit.data.config import NounsConfig
from groupvit.data.nouns import build_sidecars
from pipelines.common import load, run_stage, stage_parser

METRICS = Path("metrics/nouns.json")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("nouns", "spaCy candidate words (nouns and verbs) per sample, one sidecar per shard")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load(NounsConfig, args, "nouns")
        metrics = build_sidecars(cfg)
        metrics["spacy_model"] = cfg.spacy_model
        save_resolved(Path(cfg.output_dir) / "resolved_config.yaml", nouns=cfg)
        atomic_write(METRICS, json.dumps(metrics, indent=2) + "\n")
        print(f"nouns: {metrics['captions']} captions in {metrics['shards']} shards, {metrics['captions_per_s']} "
              f"captions/s, {metrics['mean_words']} words per caption, {metrics['no_words']} without words "
              f"(their prompts fall back to the caption)")
        return 0

    return run_stage(body)

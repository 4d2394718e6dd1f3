"""The example images of the demo page: a few held-out scenes of the embedded synthetic world, shipped in the package.

They are the first `COUNT` images of the world's test split at the default settings (`synth` section defaults,
`base.seed` 0), the images `groupvit evaluate` reports on and never tunes on, stored as lossless PNGs (the pipeline
itself writes them as JPEGs). Regenerate them after a change to the generator with

    .venv/bin/python -m pipelines.demo_examples        # writes groupvit/resources/examples/test_00000{0..3}.png

tests/test_demo.py checks that the shipped files still equal the generator's output.
"""
from __future__ import annotations

import argparse
import io
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from groupvit.atomic import atomic_write
from groupvit.synth import generate
from groupvit.synth.config import SynthConfig
from groupvit.synth.writer import eval_id

COUNT = 4  # example images on the page
SEED = 0  # base.seed of params.yaml
SPLIT = "test"  # held out: evaluate reports on it and tunes on `val`


def examples_dir() -> Path:
    """The folder of the shipped example PNGs (`groupvit/resources/examples`)."""
    return Path(str(resources.files("groupvit") / "resources" / "examples"))


def example_scenes(count: int = COUNT) -> list[tuple[str, np.ndarray]]:
    """(`test_000000`-style id, uint8 [H, W, 3] image) of the first `count` scenes of the default world's test split."""
    cfg = SynthConfig()
    spec, style = cfg.world_spec(), cfg.caption_style()
    return [(eval_id(SPLIT, i), generate(spec, style, SEED, SPLIT, i)[0].image) for i in range(count)]


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_examples(folder: Path, count: int = COUNT) -> list[Path]:
    """Write the example scenes as `<id>.png` into `folder`, each atomically; returns their paths."""
    return [atomic_write(folder / f"{name}.png", encode_png(image)) for name, image in example_scenes(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo_examples", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "groupvit" / "resources" / "examples"),
                   help="destination folder (default: groupvit/resources/examples of this checkout)")
    args = p.parse_args(argv)
    for path in write_examples(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

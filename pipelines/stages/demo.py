"""`groupvit demo [--model data/model] [--host 127.0.0.1] [--port 7860]`: the interactive segmentation page.

Serves a Gradio page (`pipelines.demo_app`) where a browser segments an uploaded image, or one of the held-out
synthetic scenes shipped with the package, with typed class names: the segmentation over the image with a class
legend, the groups of each grouping stage and each class's share of the pixels. The model is anything
`groupvit.load_pretrained` reads: a folder trained here (data/model after `make repro`), an official NVlabs `.pth`,
a Hugging Face GroupViT folder. Prompt templates, assignment, precision and threads come from the `evaluate` section
of params.yaml, as for `groupvit segment`; the page starts with the threshold `groupvit evaluate` tuned for these
weights (`<evaluate.output_dir>/thresholds.json`), else 0.95, and with the synthetic world's classes for a model
trained here (the PASCAL VOC classes for released weights). Ctrl-C, SIGTERM or SIGHUP stops the server. Not a DVC
stage.
"""
from __future__ import annotations

import ipaddress
import logging

from pipelines.common import load, run_stage, stage_parser

log = logging.getLogger("groupvit.demo")


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("demo", "the interactive segmentation web page (Gradio)")
    p.add_argument("--model", default="data/model",
                   help="model folder or checkpoint file: data/model, an official .pth, a Hugging Face GroupViT "
                        "folder (default: data/model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 serves every network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    args = p.parse_args(argv)

    def body() -> int:
        from groupvit.errors import DataError
        from groupvit.evaluation.config import EvaluateConfig
        from groupvit.synth.config import SynthConfig

        if not 1 <= args.port <= 65535:
            raise DataError(f"--port {args.port}: expected a port in 1..65535")
        cfg = load(EvaluateConfig, args, "evaluate")
        synth = load(SynthConfig, args, "synth", required=False)
        import torch

        from pipelines.demo_app import build_app, load_demo, serve  # sets GRADIO_ANALYTICS_ENABLED=False first

        try:
            import gradio  # noqa: F401
        except ImportError:
            raise DataError("gradio is not installed: `make install` installs it from requirements.lock") from None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        demo = load_demo(args.model, cfg, synth)
        if not _loopback(args.host):
            log.warning("--host %s: the page is reachable from other machines, without authentication", args.host)
        serve(build_app(demo), args.host, args.port)
        return 0

    return run_stage(body)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())

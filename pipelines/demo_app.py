"""The web page of `groupvit demo`: zero-shot segmentation of any image with any class names, in Gradio.

The page takes an image (an upload, or one of the held-out synthetic scenes shipped in `groupvit/resources/examples`),
a comma-separated class list, the background threshold and top-k, and shows the segmentation over the image with a
legend of its classes, the groups of each grouping stage (as the paper's figures) and each class's share of the
pixels. The work is `groupvit.evaluation.inference.segment_image`, the code path of `groupvit segment` and of
`groupvit evaluate`'s pictures; this module only decodes the upload, checks the inputs and lays out the results.

Bad input is a message on the page (the status line under the picture), never a crash: a file that is not an image,
an image over `MAX_UPLOAD_PIXELS` or more elongated than 64:1 (refused with the limit named), an empty or duplicated
class list, a threshold or top-k out of range. An image over `MAX_SIDE` px on its long side is downscaled to it
(keeping the ratio) before segmenting, which also bounds the prediction's upsampling to the image size; grayscale,
palette, CMYK and RGBA images are converted to RGB as `groupvit segment` reads them (alpha dropped).

Offline by construction: no analytics (`GRADIO_ANALYTICS_ENABLED=False`), no share link, no server-side rendering
process, and Gradio's default theme, whose fonts are served by the app itself (tests/test_demo.py checks in Chromium
that the page requests nothing outside 127.0.0.1). The library `groupvit` never imports Gradio; only this module does.
"""
from __future__ import annotations

import collections
import dataclasses
import html
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from groupvit.errors import ConfigError, DataError
from groupvit.evaluation.config import EvaluateConfig, ModelSpec
from groupvit.evaluation.datasets import read_lines, resource_lines
from groupvit.evaluation.inference import LoadedModel, segment_image
from groupvit.evaluation.limits import MAX_LONG_SIDE, inference_size
from groupvit.evaluation.thresholds import THRESHOLDS_FILE, tuned_threshold
from groupvit.evaluation.visualize import class_legend, group_overlays, prediction_overlay
from groupvit.synth.config import SynthConfig
from pipelines.demo_examples import examples_dir

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

log = logging.getLogger("groupvit.demo")

MAX_SIDE = 1024  # px: a larger upload is downscaled to this long side before segmenting
MAX_UPLOAD_PIXELS = 50_000_000  # px: a larger upload is refused before it is decoded
MAX_UPLOAD_SIZE = "50mb"  # file size Gradio accepts at upload
MAX_CLASSES = 100  # class names per request: each is a text-encoder forward
DISPLAY_MIN_SIDE = 256  # px: smaller results (the 64 px scenes) are enlarged for the page, nearest-neighbour
DEFAULT_BG_THRESH = 0.95  # the PASCAL VOC default, when `groupvit evaluate` tuned none for the weights
TABLE_HEADERS = ["class", "share of the pixels (%)"]
MODE_NAMES = {"1": "black and white", "L": "grayscale", "LA": "grayscale with alpha (alpha dropped)",
              "P": "a palette", "PA": "a palette with alpha (alpha dropped)", "RGBA": "RGBA (alpha dropped)",
              "CMYK": "CMYK", "I;16": "16-bit grayscale", "I": "32-bit grayscale", "F": "floating-point grayscale"}
CSS = """
.gv-legend {display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 4px 2px;}
.gv-item {display: inline-flex; align-items: center; gap: 6px;}
.gv-swatch {display: inline-block; width: 14px; height: 14px; border: 1px solid #888; border-radius: 2px;}
"""


class PromptCachingModel(LoadedModel):
    """A `LoadedModel` that keeps the class embeddings of the last few class lists: a resubmit with another
    threshold or top-k (the usual way to explore a page) does not run the text encoder again."""

    KEEP = 8  # class lists

    def __init__(self, spec: ModelSpec, precision: str):
        super().__init__(spec, precision)
        self._prompts: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    def text_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, D] normalised class embeddings of `names` (`LoadedModel.text_embeddings`), from the cache when there."""
        key = (tuple(names), tuple(templates))
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        text = super().text_embeddings(names, templates)
        self._prompts[key] = text
        while len(self._prompts) > self.KEEP:
            self._prompts.popitem(last=False)
        return text


@dataclass
class Demo:
    """What the page serves: the model, the `evaluate` settings (templates, assignment) and the page's defaults."""

    model: LoadedModel
    cfg: EvaluateConfig
    classes: list[str]  # the class list the page starts with
    classes_source: str  # where they come from, for the page
    bg_thresh: float  # the threshold slider's start
    bg_source: str  # where it comes from, for the page


def parse_class_list(text: str | None) -> list[str]:
    """The class names of a comma-separated list, stripped.

    Raises:
        DataError: no name, 'background' listed, a name listed twice (case-insensitive), or over `MAX_CLASSES`.
    """
    names = [c.strip() for c in (text or "").split(",") if c.strip()]
    if not names:
        raise DataError("class names: none given; type a comma-separated list, e.g. 'cat, dog, sky'")
    lowered = [n.lower() for n in names]
    if "background" in lowered:
        raise DataError("class names: 'background' is implicit (the pixels under the background threshold), "
                        "do not list it")
    twice = list(dict.fromkeys(n for n in names if lowered.count(n.lower()) > 1))  # in the order typed
    if twice:
        raise DataError(f"class names: {', '.join(repr(n) for n in twice)} listed more than once; list each class "
                        "once")
    if len(names) > MAX_CLASSES:
        raise DataError(f"class names: {len(names)} given, over the page's limit of {MAX_CLASSES}")
    return names


def read_upload(path: str | os.PathLike[str]) -> tuple[torch.Tensor, list[str]]:
    """Decode an uploaded image into RGB uint8 [3, H, W], within the page's limits.

    Args:
        path: the uploaded file (its name is the one in the messages).

    Returns:
        (image, notes): what was done to it for the page (converted, rotated by its EXIF orientation, downscaled).

    Raises:
        DataError: not an image PIL reads, over `MAX_UPLOAD_PIXELS`, or more elongated than the 64:1 of
            `inference_size`; each message names the file and the limit.
    """
    name = Path(path).name
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, before decoding
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_UPLOAD_PIXELS:
                raise DataError(f"{name}: {w} x {h} px is over the page's limit of {MAX_UPLOAD_PIXELS / 1e6:.0f} "
                                "megapixels; downscale it first")
            inference_size(h, w, 0, MAX_LONG_SIDE, name)  # the aspect-ratio limit every caller shares
            if im.getexif().get(0x0112, 1) != 1:  # the Orientation tag: browsers show the photo turned upright
                notes.append("turned upright by its EXIF orientation")
            upright = ImageOps.exif_transpose(im)
            rgb = upright.convert("RGB")
            if upright.mode != "RGB":
                notes.append(f"converted from {MODE_NAMES.get(upright.mode, upright.mode)} to RGB")
            if max(rgb.size) > MAX_SIDE:
                scale = MAX_SIDE / max(rgb.size)
                size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                notes.append(f"downscaled from {w} x {h} to {size[0]} x {size[1]} px (the page's limit is {MAX_SIDE} "
                             "px on the long side)")
            array = np.asarray(rgb)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (expected a JPEG, PNG, WebP, BMP, GIF or TIFF file)") from None
    except Image.DecompressionBombError:
        raise DataError(f"{name}: over the page's limit of {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels") from None
    except OSError as e:  # truncated or corrupt data
        raise DataError(f"{name}: not a readable image ({e})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1), notes


def default_classes(model_path: Path, cfg: EvaluateConfig, synth: SynthConfig) -> tuple[list[str], str]:
    """The class list the page starts with, and where it comes from.

    A model trained here (its folder holds the train stage's `resolved_config.yaml`) gets the classes of the
    synthetic world: the `class_names.txt` of the first `evaluate.segmentation` data set that has one, else
    params `synth.categories`. Released weights (an official `.pth`, a Hugging Face folder) get the 20 PASCAL VOC
    classes.
    """
    if model_path.is_dir() and (model_path / "resolved_config.yaml").is_file():
        for spec in cfg.segmentation:
            listed = Path(spec.root) / "class_names.txt"
            names = [n for n in read_lines(listed) if n != "background"] if listed.is_file() else []
            if names:
                return names, f"the classes of {spec.name} ({listed})"
        return list(synth.categories), "params synth.categories"
    return resource_lines("voc_classes_21.txt")[1:], "the 20 PASCAL VOC classes"


def load_demo(model_path: str | os.PathLike[str], cfg: EvaluateConfig, synth: SynthConfig) -> Demo:
    """Load the model and work out the page's defaults (classes, the threshold `groupvit evaluate` tuned).

    Raises:
        DataError: the model is missing or not a GroupViT checkpoint, or `thresholds.json` is malformed.
        ConfigError: the checkpoint's config describes a model this project does not compute.
    """
    path = Path(model_path)
    if not path.exists():
        raise DataError(f"--model {path}: model folder or file not found (`make repro` trains data/model; any "
                        "official .pth or Hugging Face GroupViT folder works too)")
    model = PromptCachingModel(ModelSpec("demo", str(path)), cfg.precision)
    classes, classes_source = default_classes(path, cfg, synth)
    tuned = tuned_threshold(cfg.output_dir, model.digest)
    if tuned:
        bg, bg_source = tuned[0], f"tuned on {tuned[1]} by `groupvit evaluate` for these weights"
    else:
        bg, bg_source = DEFAULT_BG_THRESH, (f"the PASCAL VOC default; none tuned for these weights in "
                                            f"{Path(cfg.output_dir) / THRESHOLDS_FILE}")
    return Demo(model, cfg, classes, classes_source, bg, bg_source)


def describe(model: LoadedModel) -> str:
    """One line on the model: where it is from and its architecture."""
    c = model.model.cfg
    stages = list(c.num_output_groups)
    grouping = (f"{len(stages)} grouping stage{'s' if len(stages) != 1 else ''} ({' -> '.join(map(str, stages))} "
                "groups)") if stages else "no grouping stage (pixel-wise ViT)"
    return (f"`{model.path}`: {c.image_size} px training size, patch {c.patch_size}, {grouping}; images are resized "
            f"to a {2 * c.image_size} px short side")


def enlarge(picture: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
    """[H, W, 3] repeated by the integer factor that brings the short side to at least `min_side` (pixels stay
    sharp: the 64 px scenes would be blurred by the browser's scaling)."""
    factor = max(1, math.ceil(min_side / min(picture.shape[:2])))
    return picture if factor == 1 else picture.repeat(factor, axis=0).repeat(factor, axis=1)


def legend_html(legend: Sequence[tuple[str, tuple[int, int, int]]]) -> str:
    """The class legend of the overlay: a colour swatch and the name of each class present."""
    items = "".join(f'<span class="gv-item"><span class="gv-swatch" style="background: rgb{colour}"></span>'
                    f"{html.escape(name)}</span>" for name, colour in legend)
    return f'<div class="gv-legend">{items}</div>'


def empty_table() -> Any:
    import pandas as pd

    return pd.DataFrame(columns=TABLE_HEADERS)


def shares_table(fractions: Sequence[tuple[str, float]]) -> Any:
    """Each predicted class and its share of the pixels, largest first."""
    import pandas as pd

    rows = sorted(fractions, key=lambda r: -r[1])
    return pd.DataFrame([[name, round(100 * share, 2)] for name, share in rows], columns=TABLE_HEADERS)


def check_settings(bg_thresh: Any, top_k: Any) -> tuple[float, int]:
    """The threshold and top-k of a request, checked (the API client can send anything).

    Raises:
        DataError: a threshold outside [0, 1] or a top-k that is not a whole number >= 0.
    """
    try:
        thr, k = float(bg_thresh), float(top_k)
    except (TypeError, ValueError):
        raise DataError(f"background threshold {bg_thresh!r} / top-k {top_k!r}: expected numbers") from None
    if not 0.0 <= thr <= 1.0:
        raise DataError(f"background threshold {thr:g}: expected a value in [0, 1]")
    if k < 0 or k != int(k):
        raise DataError(f"top-k {top_k!r}: expected a whole number >= 0 (0 keeps every class)")
    return thr, int(k)


def segment(demo: Demo, image_path: str | None, classes: str | None, bg_thresh: Any, top_k: Any) -> tuple:
    """One request of the page: (overlay [H, W, 3] or None, legend HTML, [(group map, caption)] per stage, table of
    shares, status line in Markdown). Bad input gives empty results and the reason in the status line."""
    start = time.perf_counter()
    try:
        if not image_path:
            raise DataError("no image: upload one or pick an example first")
        names = parse_class_list(classes)
        thr, k = check_settings(bg_thresh, top_k)
        image, notes = read_upload(image_path)
        cfg = dataclasses.replace(demo.cfg, top_k=k)
        result = segment_image(demo.model, image, names, cfg, thr, picture=False)
    except (ConfigError, DataError) as e:
        log.info("refused: %s", e)
        return None, "", [], empty_table(), f"**Error:** {html.escape(str(e), quote=False)}"
    overlay = enlarge(prediction_overlay(image, result.pred))
    groups = [(enlarge(picture), caption) for picture, caption in group_overlays(image, result.stage_groups)]
    h, w = image.shape[-2:]
    status = (f"Segmented {w} x {h} px into {len(names)} classes + background (threshold {thr:g}, "
              f"top-{k if k else 'all'}) in {time.perf_counter() - start:.1f} s.")
    if notes:
        status += " The image was " + "; ".join(notes) + "."
    return (overlay, legend_html(class_legend(result.pred, result.class_names)), groups,
            shares_table(result.fractions()), status)


def uploaded_file(payload: Any) -> str | None:
    """The `preprocess` of the page's image input: the uploaded file as it is, for `read_upload` to decode and to
    explain what is wrong with it (`gr.Image` itself would fail on a file that is not an image, with Gradio's bare
    "Error"). Set on the instance: a subclass of a Gradio component writes a `.pyi` stub beside its source file."""
    return None if payload is None else str(payload.path)


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks of the page; `segment` is its one event (API name `/segment`)."""
    import gradio as gr

    examples = sorted(examples_dir().glob("*.png"))
    top_k_max = max(20, len(demo.classes))
    # delete_cache: uploads and result pictures older than an hour are removed every hour, and all of them at exit
    with gr.Blocks(title="GroupViT zero-shot segmentation", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# GroupViT: zero-shot segmentation\nModel " + describe(demo.model) + ". Type any class names: "
                    "each image segment gets the class whose prompt *a photo of a {name}.* it matches best, and "
                    "background where no class reaches the threshold.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label=f"image (downscaled to {MAX_SIDE} px on the long side when larger)",
                                 type="filepath", sources=["upload", "clipboard"], height=320, elem_id="gv-image")
                image.preprocess = uploaded_file
                classes = gr.Textbox(value=", ".join(demo.classes), label="class names, comma-separated",
                                     info=f"starts with {demo.classes_source}", lines=2, elem_id="gv-classes")
                bg_thresh = gr.Slider(0.0, 1.0, value=demo.bg_thresh, step=0.01, label="background threshold",
                                      info=f"{demo.bg_thresh:g}: {demo.bg_source}", elem_id="gv-threshold")
                top_k = gr.Slider(0, top_k_max, value=demo.cfg.top_k, step=1, label="top-k classes per image",
                                  info="classes kept from the whole-image embedding (0 = all)", elem_id="gv-topk")
                submit = gr.Button("Segment", variant="primary", elem_id="gv-submit")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image],
                                label="examples: held-out scenes of the embedded synthetic world")
            with gr.Column():
                overlay = gr.Image(label="segmentation", type="numpy", format="png", interactive=False, height=320,
                                   elem_id="gv-overlay")
                legend = gr.HTML(label="classes", elem_id="gv-legend")
                status = gr.Markdown(elem_id="gv-status")
        groups = gr.Gallery(label="groups of each grouping stage", format="png", columns=4, height=300,
                            object_fit="contain", fit_columns=False, elem_id="gv-groups")
        table = gr.Dataframe(value=empty_table(), headers=TABLE_HEADERS, label="share of the pixels",
                             interactive=False, elem_id="gv-shares")
        submit.click(lambda *args: segment(demo, *args), [image, classes, bg_thresh, top_k],
                     [overlay, legend, groups, table, status], api_name="segment")
    app.queue(default_concurrency_limit=1, max_size=32)  # one segmentation at a time: torch uses every core
    return app


def launch(app: Any, host: str, port: int) -> None:
    """Start serving `app` on http://host:port in the background (offline: no share link, no analytics).

    Raises:
        DataError: the port is taken.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests to the page
    try:
        app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                   ssr_mode=False, show_error=False, max_file_size=MAX_UPLOAD_SIZE,
                   allowed_paths=[str(examples_dir())], css=CSS)
    except OSError as e:
        raise DataError(f"--port {port}: {host}:{port} is in use or cannot be bound; pick another port with --port"
                        ) from e


def serve(app: Any, host: str, port: int) -> None:
    """Serve `app` until Ctrl-C, SIGTERM or SIGHUP, then close the server (Gradio runs it in threads of this
    process, so nothing outlives it)."""
    stop = threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        launch(app, host, port)
        print(f"demo: serving http://{host}:{port} (Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            pass
        print("demo: stopping", flush=True)
    finally:
        app.close(verbose=False)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

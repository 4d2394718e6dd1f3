"""Drive the demo page in headless Chromium as a person would: upload an image, type class names, press Segment.

`segment_in_browser` is what tests/test_demo.py checks the page with; run as a script it serves the page for a model
and saves the screenshot of the README ("Try it in the browser"):

    .venv/bin/python -m pipelines.demo_browser --model data/model --out docs/demo.png

Chromium is Debian's package (`make chromium`, which `make test` runs: browsers cannot be downloaded here), driven
by Playwright through its `executable_path`. Every request the page makes outside 127.0.0.1 / localhost is refused
and reported (`PageResult.outside`): the page must work offline.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
TIMEOUT_MS = 120_000  # per wait: a segmentation on a loaded 2-core machine takes seconds, a first page load more


class BrowserMissing(RuntimeError):
    pass


def chromium_path() -> str:
    """The Chromium executable (Debian's `chromium`).

    Raises:
        BrowserMissing: none on PATH.
    """
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise BrowserMissing("no chromium found: `make chromium` installs Debian's package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PageResult:
    """What the page showed after a submit."""

    status: str  # the status line (the result's summary, or "Error: ...")
    legend: list[str] = field(default_factory=list)  # class names of the legend
    overlay_size: tuple[int, int] = (0, 0)  # (width, height) of the segmentation picture as loaded, (0, 0) if none
    groups: int = 0  # group-map pictures of the gallery
    table: list[list[str]] = field(default_factory=list)  # rows of the share table
    outside: list[str] = field(default_factory=list)  # requests to hosts other than this machine (refused)


def _read(page) -> PageResult:
    overlay = page.locator("#gv-overlay img")
    size = (0, 0)
    if overlay.count():
        size = tuple(overlay.first.evaluate("img => [img.naturalWidth, img.naturalHeight]"))
    rows = page.locator("#gv-shares [role=row]:has([role=gridcell])")  # the body rows of Gradio's virtual table
    table = [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_inner_texts()] for i in range(rows.count())]
    return PageResult(status=page.locator("#gv-status").inner_text().strip(),
                      legend=[t.strip() for t in page.locator("#gv-legend .gv-item").all_inner_texts()],
                      overlay_size=size, groups=page.locator("#gv-groups img").count(), table=table)


def _submit(page, classes: str, expect: str) -> PageResult:
    """Type `classes`, press Segment and wait until the status line changes to one containing `expect`."""
    before = page.locator("#gv-status").inner_text()
    page.locator("#gv-classes textarea").fill(classes)
    page.locator("#gv-submit").click()
    page.wait_for_function(
        "([before, expect]) => { const s = document.querySelector('#gv-status');"
        " return s && s.innerText !== before && s.innerText.includes(expect); }",
        arg=[before, expect], timeout=TIMEOUT_MS)
    return _read(page)


def segment_in_browser(url: str, image: str | Path, classes: str, bad_classes: str | None = None,
                       screenshot: Path | None = None) -> tuple[PageResult, PageResult | None]:
    """Open the page, upload `image`, type `classes`, submit and read the results.

    Args:
        url: the page (http://127.0.0.1:PORT/).
        image: the file to upload through the page's file input.
        classes: the comma-separated class names to type.
        bad_classes: then also submit this (bad) class list and read the error, when given.
        screenshot: save a PNG of the whole page after the first result here.

    Returns:
        (the result of `classes`, the result of `bad_classes` or None); both carry the refused outside requests.
    """
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def route(r) -> None:  # the page must not reach beyond this machine: refuse and record
        host = urlsplit(r.request.url).hostname or ""
        if r.request.url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route("**/*", route)
            page = context.new_page()
            page.goto(url, timeout=TIMEOUT_MS)
            page.locator("#gv-submit").wait_for(timeout=TIMEOUT_MS)
            page.locator("#gv-image input[type=file]").set_input_files(str(image))
            page.locator("#gv-image img").first.wait_for(timeout=TIMEOUT_MS)  # the upload's preview
            good = _submit(page, classes, "Segmented")
            page.locator("#gv-overlay img").first.wait_for(timeout=TIMEOUT_MS)
            good = _read(page)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
            bad = _submit(page, bad_classes, "Error") if bad_classes is not None else None
        finally:
            browser.close()
    for result in (good, bad):
        if result is not None:
            result.outside = list(outside)
    return good, bad


def main(argv: list[str] | None = None) -> int:
    from groupvit.config import load_section
    from groupvit.evaluation.config import EvaluateConfig
    from groupvit.synth.config import SynthConfig
    from pipelines.demo_app import build_app, launch, load_demo
    from pipelines.demo_examples import examples_dir

    p = argparse.ArgumentParser(prog="python -m pipelines.demo_browser", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", default="data/model")
    p.add_argument("--image", default=str(examples_dir() / "test_000000.png"), help="image to upload")
    p.add_argument("--classes", default="", help="class names to type (default: the page's own list)")
    p.add_argument("--out", default="docs/demo.png", help="screenshot (default: docs/demo.png)")
    args = p.parse_args(argv)
    demo = load_demo(args.model, load_section(EvaluateConfig, args.params, "evaluate"),
                     load_section(SynthConfig, args.params, "synth", required=False))
    app, port = build_app(demo), free_port()
    launch(app, "127.0.0.1", port)
    try:
        good, _ = segment_in_browser(f"http://127.0.0.1:{port}/", args.image, args.classes or ", ".join(demo.classes),
                                     screenshot=Path(args.out))
    finally:
        app.close(verbose=False)
    print(f"{args.out}: {good.status} legend: {', '.join(good.legend)}")
    if good.outside:
        print(f"refused requests outside this machine: {good.outside}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The HTML report in a real headless browser: write it (from a run's report JSON and output, or from a run made
now), check it parses and holds its plots, open it in Chromium (``apt-get install chromium``), save a screenshot
and check the browser's DOM holds every section.

    # a run made now: the first 600 test rows of movie_sentiment against an endpoint right 85% of the time
    python benchmarks/report_screenshot.py --run movie_sentiment --rows 600 --noisy-endpoint 0.85 \\
        --work runs/report_demo --png benchmarks/figures/report.png
    # an existing run
    python benchmarks/report_screenshot.py --report runs/x/report.json --png /tmp/report.png

A run needs Ray (give it a private loopback where others run Ray too). Prints what it checked; exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import base64
import html.parser
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fake_openai: the endpoint of a run made now

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(html.parser.HTMLParser):
    """What the checks read from a page: section titles and the images' sources."""

    def __init__(self):
        super().__init__()
        self.h2: list[str] = []
        self.images: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self.h2.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def read_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def check_html(path: Path) -> tuple[list[str], list[str]]:
    """Checks on the file itself: every image an embedded PNG, nothing fetched from elsewhere. Returns the
    section titles and the failures."""
    text = path.read_text(encoding="utf-8")
    page = read_page(text)
    failures = []
    for i, src in enumerate(page.images):
        head = "data:image/png;base64,"
        if not src.startswith(head) or not base64.b64decode(src[len(head):]).startswith(PNG_MAGIC):
            failures.append(f"image {i} is not an embedded PNG")
    if "http://" in text.replace("http://127.0.0.1", "") or "https://" in text or "<script" in text:
        failures.append("the page refers to something outside itself, or holds a script")
    print(f"{path}: {len(text) / 1024:.0f} KiB, parses, {len(page.images)} embedded PNG plots, "
          f"sections: {', '.join(page.h2)}")
    return page.h2, failures


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium on PATH: apt-get install -y chromium")


def screenshot(path: Path, png: Path, *, width: int, height: int) -> tuple[list[str], list[str]]:
    """Chromium headless: a screenshot of the page and its DOM after loading. Returns the DOM's section
    titles and the failures."""
    exe = browser()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}"]
    url = path.resolve().as_uri()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    subprocess.run([*flags, f"--screenshot={png}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    failures = []
    if not png.is_file() or not png.read_bytes().startswith(PNG_MAGIC):
        failures.append(f"Chromium made no screenshot at {png}")
    page = read_page(dom)
    print(f"chromium ({exe}): screenshot {png} ({png.stat().st_size / 1024:.0f} KiB); the DOM it loaded holds "
          f"{len(page.images)} images and {len(page.h2)} sections")
    return page.h2, failures


def shrink(png: Path, *, width: int, max_kib: int) -> None:
    """Scale the screenshot to ``width`` pixels and reduce its colours until it is under ``max_kib``."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    for colours in (256, 128, 64):
        img.quantize(colors=colours).save(png, optimize=True)
        if png.stat().st_size <= max_kib * 1024:
            break
    print(f"screenshot scaled to {img.width}x{img.height}, {png.stat().st_size / 1024:.0f} KiB")


def run_demo(args) -> Path:
    """Label the first ``--rows`` test rows of ``--run`` against the noisy endpoint; returns the JSON report."""
    from common import base_task, noisy_responder, write_sample

    from labelwright.orchestrator.job import annotate
    from labelwright.orchestrator.spec import load_task
    from tests.fake_openai import FakeOpenAI

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    sample, labels = write_sample(args.run, args.rows, work)
    with FakeOpenAI(noisy_responder(args.run, labels, args.noisy_endpoint),
                    model=f"noisy-{args.noisy_endpoint:g}") as server:
        args.base_url, args.model, args.seed_size = server.base_url, server.model, None
        task = base_task(args.run, labels, cache_path=str(work / "cache.sqlite"), args=args)
        task["controller"].update(price_prompt_per_1k=args.price_prompt_per_1k,
                                  price_completion_per_1k=args.price_completion_per_1k)
        task["voting"] = {"route": args.route}
        annotate(sample, spec=load_task(None, task), output=work / "labels.parquet", report_path=work / "report.json")
    return work / "report.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--report", help="a run's report JSON (its output frame is read from the report's 'output')")
    src.add_argument("--run", metavar="DATASET", help="make a run now on this shared dataset")
    ap.add_argument("--output", help="the run's output, when not where the report says")
    ap.add_argument("--html", help="where to write the HTML (default: beside the report, .html)")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--noisy-endpoint", type=float, default=0.85, metavar="ACCURACY")
    ap.add_argument("--price-prompt-per-1k", type=float, default=0.00015, help="the endpoint's price, USD")
    ap.add_argument("--price-completion-per-1k", type=float, default=0.0006)
    ap.add_argument("--route", choices=["threshold", "measured"], default="threshold",
                    help="voting.route of the run made now")
    ap.add_argument("--work", default="runs/report_demo")
    ap.add_argument("--png", default=None, help="the screenshot (default: a temporary file)")
    ap.add_argument("--window", default="1200,3000", help="the browser window, WIDTH,HEIGHT")
    ap.add_argument("--shrink-to", type=int, default=800, help="scale the screenshot to this width (0: keep)")
    args = ap.parse_args()

    from labelwright.orchestrator.dataset_io import read_frame
    from labelwright.orchestrator.report import html_report_path
    from labelwright.orchestrator.report_html import write_html_report

    report_path = run_demo(args) if args.run else Path(args.report)
    report = json.loads(report_path.read_text())
    html_path = Path(args.html) if args.html else html_report_path(report_path)
    if args.report or args.html:  # a run made now has written it already
        output = Path(args.output or report["output"])
        write_html_report(report, read_frame(output), html_path)
    sections, failures = check_html(html_path)
    png = Path(args.png) if args.png else Path(tempfile.mkdtemp()) / "report.png"
    width, height = (int(x) for x in args.window.split(","))
    dom_sections, more = screenshot(html_path, png, width=width, height=height)
    failures += more
    if dom_sections != sections:
        failures.append(f"the browser's DOM has sections {dom_sections}, the file {sections}")
    if args.shrink_to:
        shrink(png, width=args.shrink_to, max_kib=400)
    for f in failures:
        print("FAILED:", f)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The HTML pages a person opens (``fxslim report --format html``, the demo's index.html), rendered
in headless Chromium at 1000 px: every image loads, nothing overflows sideways, no console errors.

Skipped where no browser is installed (``make browser`` installs Debian's chromium).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fxslim.app.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make browser)")

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Collects errors from the start, then writes what the page looks like into its title on load.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(' ')); __consoleError(...args); };
window.addEventListener('load', () => {
  const images = [...document.images];
  const root = document.documentElement;
  document.title = JSON.stringify({images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    overflow: root.scrollWidth - root.clientWidth, errors: window.__errors});
});
</script>"""


def render(page: Path, tmp_path: Path, width: int = 1000) -> dict:
    """Open ``page`` in headless Chromium ``width`` px wide; what the probe saw."""
    probed = tmp_path / f"probed_{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    out = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom",
                          probed.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    title = re.search(r"<title>(.*?)</title>", out.stdout, re.S)
    assert title, f"no title in the rendered page: {out.stderr[-500:]}"
    return json.loads(html.unescape(title.group(1)))


def _assert_readable(seen: dict, images: int) -> None:
    assert seen["images"] >= images and seen["broken"] == 0, seen
    assert seen["overflow"] <= 0, f"the page is {seen['overflow']} px wider than the window"
    assert seen["errors"] == [], seen["errors"]


@pytest.mark.parametrize("passes", [[], ["--passes", "haste:L=14"]])
def test_report_page_renders_at_1000_px(tmp_path, passes):
    page = tmp_path / "report.html"
    assert main(["report", "torchvision:mobilenet_v2", "--input", "1x3x64x64", *passes, "--format", "html",
                 "--out", str(page)]) == 0
    _assert_readable(render(page, tmp_path), images=1 if not passes else 2)


@pytest.mark.slow
def test_demo_page_renders_at_1000_px(tmp_path):
    from fxslim.app.demo import demo_command

    assert demo_command(tmp_path / "demo", parts=["haste"], quick=True) == 0
    _assert_readable(render(tmp_path / "demo" / "index.html", tmp_path), images=3)

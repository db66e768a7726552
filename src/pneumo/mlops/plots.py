"""`dvc plots show` as a page that works offline.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network it stays
blank. ``dvc plots show --html-template`` takes a page of our own: with no ``{scripts}``
placeholder DVC adds no CDN tags, and ours carries the three libraries inline, bundled by
vl-convert.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pneumo.files import write_text_atomic

VEGA_LITE = "5.21"  # DVC writes Vega-Lite v5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>pneumo plots</title>
    <script>{bundle}</script>
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def offline_template() -> str:
    """DVC's page with the libraries inline; they define ``vegaEmbed`` on ``window``, which
    DVC's plot scripts call as the page loads."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    # Wrapped in a function so the bundle's top-level names cannot clash with DVC's scripts.
    return PAGE.format(bundle=f"(function () {{\n{bundle}\n}})();")


def show(out_dir: Path, template: Path) -> Path:
    """Write ``template``, then ``dvc plots show`` into ``out_dir``; returns the page."""
    write_text_atomic(template, offline_template())
    subprocess.run(
        ["dvc", "plots", "show", "--html-template", str(template), "-o", str(out_dir)],
        check=True,
    )
    return out_dir / "index.html"

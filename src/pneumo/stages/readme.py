"""Stage `readme`: README.md's results block rewritten from reports/comparison.json."""

from __future__ import annotations

from pathlib import Path

from pneumo.markdown import render_comparison, update_readme_block
from pneumo.records import Comparison


def readme(reports_dir: Path, readme_file: Path) -> bool:
    """Whether the block changed."""
    return update_readme_block(readme_file, render_comparison(Comparison.read(reports_dir)))

"""The `pneumo` command: one sub-command per DVC stage, plus promote, predict and schema.

Heavy libraries (torch, mlflow, dvc) are imported inside the commands that need them, so
``pneumo --help`` and argument errors answer at once.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pneumo import paths
from pneumo.errors import UserError


class PneumoError(click.ClickException):
    """Shown as one line ``Error: ...`` with exit status 1, no traceback."""


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's own error types into clear one-line errors."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise PneumoError(str(exc)) from exc

    return wrapper


def _params(ctx: click.Context):
    from pneumo.config import load_params

    return load_params(ctx.obj["params"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Parameters file.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, params: Path, verbose: bool) -> None:
    """Train, compare and ship chest X-ray pneumonia classifiers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "alembic", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"params": params}


@main.command()
@click.pass_context
@_friendly
def fetch(ctx: click.Context) -> None:
    """Bring images from data.source into data/raw with a manifest."""
    from pneumo.fetch import fetch as run_fetch

    params = _params(ctx)
    run_fetch(params.data, paths.RAW_DIR, seed=params.seed)


@main.command()
@click.option("--workers", default=2, show_default=True, help="Decoding processes.")
@click.pass_context
@_friendly
def preprocess(ctx: click.Context, workers: int) -> None:
    """Validate, de-duplicate, split by patient and cache data/raw into data/processed."""
    from pneumo.preprocess import preprocess as run_preprocess

    params = _params(ctx)
    run_preprocess(params.data, paths.RAW_DIR, paths.PROCESSED_DIR, params.seed, workers)


@main.command()
@click.pass_context
@_friendly
def schema(ctx: click.Context) -> None:
    """Print the JSON schema of params.yaml (every key, type, default and range)."""
    from pneumo.config import Params

    click.echo(json.dumps(Params.model_json_schema(), indent=2))


@main.command()
@click.pass_context
@_friendly
def check(ctx: click.Context) -> None:
    """Validate params.yaml and exit."""
    _params(ctx)
    click.echo(f"{ctx.obj['params']}: valid")

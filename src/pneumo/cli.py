"""The `pneumo` command: one sub-command per DVC stage, plus promote, predict and schema.

Heavy libraries (torch, mlflow, dvc) are imported inside the commands that need them, so
``pneumo --help`` and argument errors answer at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import subprocess
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
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "pneumo":
                raise
            # An install with the `runtime` extra only: it predicts with ONNX, nothing else.
            raise PneumoError(
                f"this command needs {exc.name.split('.')[0]}, which is not installed: pip "
                "install 'pneumo[pipeline]' (the runtime extra predicts with ONNX only)"
            ) from exc

    return wrapper


def _clean_stop(command: Callable[..., Any]) -> Callable[..., Any]:
    """For the stages: SIGTERM stops them as Ctrl-C does (pneumo.interrupts), so the MLflow
    run ends as KILLED and no half-written output stays; the exit status is then 143."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pneumo.interrupts import EXIT_STATUS, Terminated, sigterm_raises

        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except Terminated as exc:
            logging.getLogger("pneumo").error("%s before the stage finished", exc)
            sys.exit(EXIT_STATUS)

    return wrapper


def _params(ctx: click.Context):
    from pneumo.config import load_params

    return load_params(ctx.obj["params"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    default=paths.PARAMS,
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
@_clean_stop
def fetch(ctx: click.Context) -> None:
    """Bring images from data.source into data/raw with a manifest."""
    from pneumo.stages.fetch import fetch as run_fetch

    params = _params(ctx)
    run_fetch(params.data, paths.RAW_DIR, seed=params.seed)


@main.command()
@click.option("--workers", default=2, show_default=True, help="Decoding processes.")
@click.pass_context
@_friendly
@_clean_stop
def preprocess(ctx: click.Context, workers: int) -> None:
    """Validate, de-duplicate, split by patient and cache data/raw into data/processed."""
    from pneumo.stages.preprocess import preprocess as run_preprocess

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


@main.command()
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Validate params.yaml and write every resolved value to reports/params.json."""
    from pneumo.config import ConfigError
    from pneumo.stages.validate import validate as run_validate

    try:
        run_validate(ctx.obj["params"], paths.RESOLVED_PARAMS)
    except ConfigError as exc:
        raise PneumoError(
            f"{exc}\nNothing was run or removed. {ctx.obj['params']} keeps the value set "
            "(`dvc exp run -S` does not undo it): fix it, or `git checkout params.yaml`"
        ) from exc
    click.echo(f"{ctx.obj['params']}: valid → {paths.RESOLVED_PARAMS}")


def _run_forwarding_sigterm(command: list[str]) -> int:
    """Run ``command``; on SIGTERM, pass it on (torchrun stops its workers) and wait."""
    from pneumo.interrupts import Terminated

    with subprocess.Popen(command) as process:
        try:
            return process.wait()
        except Terminated:
            process.terminate()
            process.wait()
            raise


@main.command()
@click.argument("backbone")
@click.pass_context
@_friendly
@_clean_stop
def train(ctx: click.Context, backbone: str) -> None:
    """Train BACKBONE on the cache; writes checkpoints/BACKBONE and its reports.

    With train.nproc > 1 it starts itself under torchrun, one process per GPU (or CPU share).
    """
    from pneumo.config import BACKBONES

    # Checked against the known names, not params.backbones: reading that list would make
    # every train@ stage depend on it, and adding a backbone would retrain the others.
    if backbone not in BACKBONES:
        raise PneumoError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    params = _params(ctx)
    if params.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc}", "-m", "pneumo",
            "--params", str(ctx.obj["params"]), "train", backbone,
        ]  # fmt: skip
        ctx.exit(_run_forwarding_sigterm(launch))
    from pneumo.platforms import prepare_kernels

    prepare_kernels(params.train.deterministic)  # before torch loads
    from pneumo.stages.train import train as run_train

    run_train(
        params,
        backbone,
        paths.PROCESSED_DIR,
        paths.checkpoint_dir(backbone),
        paths.train_report_dir(backbone),
        paths.history_csv(backbone),
    )


@main.command()
@click.argument("backbone")
@click.pass_context
@_friendly
@_clean_stop
def evaluate(ctx: click.Context, backbone: str) -> None:
    """Evaluate BACKBONE with TTA; writes reports/eval/BACKBONE and the model folder
    models/BACKBONE."""
    params = _params(ctx)
    from pneumo.platforms import prepare_kernels

    prepare_kernels(params.train.deterministic)  # before torch loads
    from pneumo.stages.evaluate import evaluate as run_evaluate

    run_evaluate(
        params,
        backbone,
        paths.PROCESSED_DIR,
        paths.checkpoint_dir(backbone),
        paths.model_dir(backbone),
        paths.eval_report_dir(backbone),
    )


@main.command()
@click.argument(
    "folders",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--format", "formats", multiple=True, type=click.Choice(["onnx", "torchscript"]),
    help="Repeatable (default: both).",
)  # fmt: skip
@click.option(
    "--images",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Image files or a folder to check each graph against torch on (default: 64 generated "
    "phantoms at the model's image size).",
)
@_friendly
def export(folders: tuple[Path, ...], formats: tuple[str, ...], images: Path | None) -> None:
    """Write ONNX and TorchScript graphs into model folders, each checked against torch
    (evaluate does it, on the test split, for the folders it makes)."""
    from pneumo.core.export import FORMATS, export_folder, parity_images
    from pneumo.core.runtime import verified_settings
    from pneumo.mlops.predict import expand_inputs
    from pneumo.records import InferenceSettings, ModelCard

    files = expand_inputs([images]) if images else None
    for folder in folders:
        # the weights are the ones the settings were chosen for
        verified_settings(folder, reads="torch")
        card = ModelCard.read(folder)
        pixels = parity_images(card.image_size, card.resize, files)
        parity = export_folder(folder, pixels, list(formats or FORMATS))
        exports = InferenceSettings.read(folder).exports
        for fmt, exported in ((fmt, exports[fmt]) for fmt in parity):
            click.echo(
                f"{folder / exported.file}: {fmt} ({exported.version}), max |Δp| from torch "
                f"{parity[fmt]:.2g} on {len(pixels)} images"
            )


@main.command("evaluate-external")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    "models",
    multiple=True,
    help="A model folder or models:/<name>@<alias>; repeatable (default: every model folder of "
    "params.yaml's backbones and the registered champion, if there is one).",
)
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.pass_context
@_friendly
def evaluate_external(
    ctx: click.Context, name: str, path: Path, models: tuple[str, ...], device: str
) -> None:
    """Evaluate models on the labelled images at PATH (a folder or .zip with NORMAL/ and
    PNEUMONIA/ folders at any depth, or a CSV of path,label) at the settings each chose on
    validation; writes reports/external/NAME.json and prints a Markdown table. A data set
    listed in params.yaml's evaluate.external is evaluated by `dvc repro` instead."""
    from pydantic import ValidationError

    from pneumo.config import ExternalSet
    from pneumo.stages.evaluate import evaluate_external_models

    params = _params(ctx)
    try:
        spec = ExternalSet(name=name, path=str(path))
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="NAME") from None
    table = evaluate_external_models(
        params, spec, list(models), device, paths.external_report(name)
    )
    click.echo(table)


@main.command()
@click.pass_context
@_friendly
@_clean_stop
def compare(ctx: click.Context) -> None:
    """Compare all backbones on the same test images; rank them on validation."""
    params = _params(ctx)
    from pneumo.stages.compare import compare as run_compare

    eval_dirs = {backbone: paths.eval_report_dir(backbone) for backbone in params.backbones}
    result = run_compare(params, params.backbones, eval_dirs, paths.REPORTS_DIR)
    click.echo(f"best by {params.compare.select_by}: {result.best}")


@main.command()
@click.pass_context
@_friendly
@_clean_stop
def register(ctx: click.Context) -> None:
    """Register every model folder in the MLflow registry (once each); point @challenger at
    the comparison's best if it beats the current one."""
    params = _params(ctx)
    from pneumo.mlops import registry
    from pneumo.stages.register import register as run_register

    registered = run_register(
        params,
        paths.REPORTS_DIR,
        {backbone: paths.eval_report_dir(backbone) for backbone in params.backbones},
        {backbone: paths.model_dir(backbone) for backbone in params.backbones},
        paths.RAW_DIR,
    )
    click.echo(
        f"{registered.model_name} versions {registered.versions} in the {registered.store} "
        f"store; @{registry.CHALLENGER} = v{registered.challenger} ({registered.why})"
    )


@main.command()
@_friendly
def readme() -> None:
    """Rewrite README.md's results block from reports/comparison.json."""
    from pneumo.stages.readme import readme as run_readme

    changed = run_readme(paths.REPORTS_DIR, paths.README)
    click.echo(f"{paths.README}: results block {'updated' if changed else 'unchanged'}")


@main.command()
@click.option(
    "-o", "--out", default="dvc_plots", show_default=True,
    type=click.Path(file_okay=False, path_type=Path), help="Folder of the HTML page.",
)  # fmt: skip
def plots(out: Path) -> None:
    """`dvc plots show` into a page that needs no network (Vega libraries inline)."""
    from pneumo.mlops.plots import show

    click.echo(f"open {show(out, paths.PLOTS_TEMPLATE)}")


@main.command()
@click.option(
    "--version", "version", default=None, metavar="N", help="Promote this version, not @challenger."
)
@click.option(
    "--force", is_flag=True, help="Promote even if the gate refuses (recorded as forced)."
)
@click.option("--history", is_flag=True, help="Print every promotion decision, newest last.")
@click.pass_context
@_friendly
def promote(ctx: click.Context, version: str | None, force: bool, history: bool) -> None:
    """Move the @champion alias to @challenger (or --version) if it passes the gate.

    The gate refuses a model below registry.min_val_auc or registry.min_prediction_spread, one
    validated on other data than the champion, or one ranked worse than the champion by
    compare.select_by. Every decision is recorded (--history).
    """
    params = _params(ctx)
    from pneumo.mlops import promotion

    if history:
        if version is not None or force:
            raise PneumoError("--history only prints the record: it takes no --version or --force")
        click.echo(promotion.render_history(promotion.history(params)))
        return
    click.echo(promotion.promote(params, version=version, force=force))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    default=None,
    help="A model folder such as models/resnet50, or models:/<name>@<alias> "
    "(default: models:/<registry name>@champion).",
)
@click.option("--output", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--explain",
    "explain_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write a Grad-CAM heatmap PNG per image into this folder.",
)
@click.option(
    "--allow-ood",
    is_flag=True,
    help="Label inputs the input gate flags as unlike the training images, too.",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "onnx", "torch"]),
    default="auto",
    show_default=True,
    help="What runs the network: ONNX Runtime (no torch needed), torch, or auto (ONNX where "
    "the model folder has its graph, onnxruntime is installed and --device is the CPU or a "
    "GPU onnxruntime can use; torch for --explain).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=True, path_type=Path),
    default=None,
    help="Write the rows to this .csv file or .parquet folder instead of standard output.",
)
@click.option(
    "--skip-done",
    is_flag=True,
    help="With --out: continue an earlier (killed) run, skipping the files it answered.",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="Images per forward pass, each in every TTA view [default: 64 on a GPU; 8 on a CPU, "
    "which is no faster with more, and ResNet50 at 224 px holds about 35 MiB per image].",
)
@click.option(
    "--workers",
    default=min(4, os.cpu_count() or 1),
    show_default="up to 4",
    type=click.IntRange(min=1),
    help="Threads decoding the next batch while the network runs on this one.",
)
@click.pass_context
@_friendly
def predict(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    model: str | None,
    output: str,
    device: str,
    explain_dir: Path | None,
    allow_ood: bool,
    runtime: str,
    out: Path | None,
    skip_done: bool,
    batch_size: int | None,
    workers: int,
) -> None:
    """Predict PNEUMONIA for image files or folders; unreadable files make the exit code 1.

    An input the model's input gate flags gets in_distribution false, a reason and no label
    (unless --allow-ood); one in the referral band is answered REFER.
    """
    from pneumo.mlops import predict as prediction

    if skip_done and out is None:
        raise PneumoError("--skip-done continues an --out file: pass --out too")
    files = prediction.expand_inputs(list(inputs))  # a wrong path fails before loading a model
    columns = prediction.COLUMNS + (["explanation"] if explain_dir else [])
    target = prediction.PredictionFile(out, columns, skip_done) if out else None
    if target is not None:
        done = target.done()
        files = [file for file in files if str(file) not in done]
        if done:
            click.echo(f"{len(done)} files already in {out}: {len(files)} to go", err=True)
    if explain_dir is not None and runtime == "onnx":
        raise PneumoError("--explain (Grad-CAM) needs the network's gradients: --runtime torch")
    if explain_dir is not None:
        runtime = "torch"
    quick_start = len(files) < prediction.PROGRESS_FROM
    classifier = prediction.load_classifier(
        model, device, lambda: _params(ctx), runtime, quick_start
    )
    batch_size = batch_size or (64 if classifier.on_gpu else 8)
    rows = prediction.predict_files(
        classifier, files, explain_dir, allow_ood, batch_size=batch_size, workers=workers
    )
    if target is None:
        failed = prediction.write_rows(rows, output, sys.stdout, columns)
    else:
        written, failed = target.write(rows)
        click.echo(f"wrote {written} rows to {out}", err=True)
    if failed:
        ctx.exit(1)


@main.command()
@click.option(
    "--model",
    default=None,
    help="A model folder such as models/resnet50, or models:/<name>@<alias> "
    "(default: models:/<registry name>@champion).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.pass_context
@_friendly
def app(ctx: click.Context, model: str | None, host: str, port: int, device: str) -> None:
    """Serve a page to try a model in a browser: upload an image, see the answer and its
    Grad-CAM (research use only, not for diagnosis)."""
    from pneumo.mlops import app as page
    from pneumo.mlops import predict as prediction

    if model is None:
        model = f"models:/{_params(ctx).registry.model_name}@champion"
    # torch: the page shows Grad-CAM, which needs the network's gradients
    classifier = prediction.load_classifier(model, device, lambda: _params(ctx), "torch")
    page.serve(classifier, page.identify(model), host, port)


@main.command()
@click.argument("names", nargs=-1)
@click.option("-j", "--jobs", default=1, show_default=True, help="Experiments run at once.")
@click.option("--prefix", default="", help="Prefix for the experiment names.")
@click.option(
    "-S", "--set", "sets", multiple=True, metavar="KEY=VALUE",
    help="Extra override for every approach, e.g. -S data.image_size=64 (YAML value).",
)  # fmt: skip
@click.pass_context
@_friendly
def approaches(
    ctx: click.Context, names: tuple[str, ...], jobs: int, prefix: str, sets: tuple[str, ...]
) -> None:
    """Queue the approaches in configs/approaches/ (default: all five) as DVC experiments and
    run them JOBS at a time."""
    import yaml

    from pneumo.config import nest_dotted
    from pneumo.mlops import experiments, store

    if Path(ctx.obj["params"]).resolve() != paths.PARAMS.resolve():
        raise PneumoError(
            f"approaches are DVC experiments of this repository's pipeline, which reads "
            f"{paths.PARAMS}: drop --params (put other settings in an approach or -S KEY=VALUE)"
        )
    params = _params(ctx)
    chosen = list(names) or list(experiments.APPROACH_ORDER)
    dotted: dict = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise PneumoError(f"--set {item!r} is not KEY=VALUE")
        dotted[key] = yaml.safe_load(value)
    extra = nest_dotted(dotted)
    # Create the tracking database once, before parallel experiments race to migrate it.
    store.configure(params.tracking)
    done = experiments.queue_and_run(chosen, jobs=jobs, prefix=prefix, extra=extra)
    click.echo(f"finished experiments: {', '.join(done)}; next: pneumo report")


@main.command()
@click.argument("names", nargs=-1)
@click.option("--prefix", default="", help="Prefix of the experiment names.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the Markdown here only (no reports/experiments.*, no README change).",
)
@click.pass_context
@_friendly
def report(ctx: click.Context, names: tuple[str, ...], prefix: str, output: Path | None) -> None:
    """Tables of the finished approach experiments → reports/experiments.{json,md}, README."""
    import subprocess

    from pneumo.markdown import update_readme_block
    from pneumo.mlops import experiments

    chosen = [f"{prefix}{n}" for n in (names or experiments.APPROACH_ORDER)]
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json", "--all-commits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    collected = experiments.collect(json.loads(shown), chosen)
    result = experiments.build_report(
        {name.removeprefix(prefix): content for name, content in collected.items()}
    )
    markdown = experiments.render_report(result)
    if output is not None:
        output.write_text(markdown)
    else:
        paths.EXPERIMENTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
        paths.EXPERIMENTS_MD.write_text(markdown)
        update_readme_block(paths.README, markdown, name="experiments")
    click.echo(markdown)


@main.command()
@click.argument("search_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trials", type=click.IntRange(min=1), default=None,
    help="The study's budget: workers sharing the study stop once it holds this many trials.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None,
    help="This worker starts no trial after SECONDS.",
)  # fmt: skip
@click.option(
    "--storage", default=None,
    help="Optuna storage URL [default: sqlite:///<repo>/optuna.db]; workers on several machines "
    "share a study through the team's postgresql://…/optuna (scripts/team-server).",
)  # fmt: skip
@click.option("--study", "study_name", default=None, help="[default: the search file's name]")
@click.option(
    "--report", is_flag=True,
    help="Write reports/tune/<study>/ from the study as it stands (trials write it too).",
)  # fmt: skip
@click.option(
    "--apply", is_flag=True,
    help="Write the best trial as configs/approaches/tuned-<study>.yaml and print the "
    "`dvc exp run` that takes it through the pipeline.",
)  # fmt: skip
@click.pass_context
@_friendly
@_clean_stop
def tune(
    ctx: click.Context,
    search_file: Path,
    trials: int | None,
    timeout: float | None,
    storage: str | None,
    study_name: str | None,
    report: bool,
    apply: bool,
) -> None:
    """Search hyperparameters with Optuna (SEARCH_FILE: configs/search/*.yaml): every trial a
    nested MLflow run, pruned on its per-epoch validation metric; start more workers with the
    same command to share the study."""
    from pneumo.config import load_yaml
    from pneumo.mlops import tune as tuning
    from pneumo.mlops import tune_report
    from pneumo.mlops.search import load_search

    if trials is None and timeout is None and not (report or apply):
        raise PneumoError(
            "nothing to do: --trials N and/or --timeout SECONDS run trials; --report and "
            "--apply use the study's results"
        )
    params, base = _params(ctx), load_yaml(ctx.obj["params"])
    search = load_search(search_file, base)
    name = tuning.check_study_name(study_name or search_file.stem)
    storage = storage or tuning.default_storage()
    runs_trials = trials is not None or timeout is not None
    if runs_trials:
        tuning.check_can_train(params)
    study, created = tuning.open_study(name, storage, search)
    parent_run = None
    if runs_trials:
        from pneumo.platforms import prepare_kernels

        prepare_kernels(params.train.deterministic)  # before torch loads
        worker = tuning.run_trials(
            study, created, search, (search_file, storage), base, params, (trials, timeout),
        )  # fmt: skip
        parent_run = worker.parent_run
    if runs_trials or report:
        folder = tune_report.publish(study, search, parent_run)
        click.echo(f"study {name}: report in {folder}", err=True)
    if apply:
        file, command = tune_report.apply_best(study, search)
        click.echo(f"wrote {file}; run it through the pipeline with `pneumo approaches "
                   f"{file.stem}`, or:", err=True)  # fmt: skip
        # -S values hold Hydra's single quotes: double quotes read better in a shell
        click.echo(" ".join(
            f'"{part}"' if "'" in part and not set('"$`\\!') & set(part) else shlex.quote(part)
            for part in command
        ))  # fmt: skip

"""`pneumo predict`: PNEUMONIA probability and label for image files and folders.

A model folder is loaded by :mod:`pneumo.core.inference` alone, without MLflow, so one image
from a new process answers quickly. A ``models:/<name>@<alias>`` URI loads the registered MLflow
model (:mod:`pneumo.mlops.serving`), which wraps the same
:class:`~pneumo.core.inference.Classifier`. Files are read, predicted and written a batch at a
time, so a folder of any size runs in bounded memory.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pneumo.core.images import IMAGE_SUFFIXES
from pneumo.core.inference import Classifier
from pneumo.errors import UserError

if TYPE_CHECKING:
    from pneumo.config import Params

COLUMNS = ["file", "probability", "label", "in_distribution", "gate_score", "reason", "error"]
PROGRESS_FROM = 8  # files; fewer finish before a progress bar would say anything


class PredictError(UserError):
    """The model or the inputs to predict on cannot be used; the message says what to do."""


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders contribute their image files, recursively and sorted.

    A folder without any image file is an error: predicting nothing and exiting 0 would
    hide a wrong path.
    """
    files: list[Path] = []
    for item in inputs:
        if not item.is_dir():
            files.append(item)
            continue
        images = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PredictError(
                f"{item} holds no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files += images
    return files


def load_classifier(model: str | None, device: str, params: Callable[[], Params]) -> Classifier:
    """A model folder, or a registry URI (default ``models:/<registry.model_name>@champion``).

    ``params`` is called only for the registry, which needs the tracking settings: a model
    folder predicts anywhere, without params.yaml.
    """
    if model and not model.startswith("models:/"):
        return Classifier.load(Path(model), device)
    import mlflow

    from pneumo.mlops import tracking

    settings = params()
    tracking.configure(settings.tracking)
    uri = model or f"models:/{settings.registry.model_name}@champion"
    try:
        loaded = mlflow.pyfunc.load_model(uri, model_config={"inference_device": device})
    except mlflow.exceptions.MlflowException as exc:
        raise PredictError(
            f"cannot load {uri} from {mlflow.get_tracking_uri()}: {exc.message}. "
            "Run `dvc repro` and `pneumo promote`, or pass --model models/<backbone>"
        ) from exc
    return loaded.unwrap_python_model().classifier


def predict_files(
    classifier: Classifier,
    files: list[Path],
    explain_dir: Path | None = None,
    allow_ood: bool = False,
) -> Iterator[dict]:
    """Rows in file order with a progress bar on stderr; with ``explain_dir``, a Grad-CAM
    PNG per predicted image (named in the row's ``explanation``); ``allow_ood`` labels the
    inputs the gate flags, too."""
    from tqdm import tqdm

    explanations = Explanations(classifier, explain_dir) if explain_dir else None
    with tqdm(
        total=len(files), unit="img", file=sys.stderr, disable=len(files) < PROGRESS_FROM
    ) as progress:
        for row in classifier.predict_files(files, allow_ood=allow_ood):
            if explanations is not None and "error" not in row:
                row["explanation"] = str(explanations.write(Path(row["file"]), row))
            progress.update()
            yield row


class Explanations:
    """Grad-CAM figures of predicted files, ``<file stem>.png`` in one folder (numbered when
    two inputs share a name), for the layer chosen for the model's backbone and image size."""

    def __init__(self, classifier: Classifier, out_dir: Path) -> None:
        from pneumo.core import explain

        self.explain = explain
        self.classifier = classifier
        self.out_dir = out_dir
        self.taken: set[str] = set()
        _, self.layer = explain.target_layer(classifier.net, classifier.image_size)
        out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, file: Path, row: dict) -> Path:
        pixels = self.classifier.prepare(file.read_bytes())
        cam = self.explain.grad_cam(self.classifier.net, pixels[None], self.layer)[0]
        name, number = f"{file.stem}.png", 1
        while name in self.taken:
            number += 1
            name = f"{file.stem}-{number}.png"
        self.taken.add(name)
        label, band = row["label"], self.classifier.settings.referral
        if label == band.LABEL:  # say why: the probability lies in the band
            label = f"{label}: in the referral band [{band.low:.3f}, {band.high:.3f})"
        if not row["in_distribution"]:
            label = f"{label or 'no label'}: unlike the training images (input gate)"
        return self.explain.explanation_png(
            pixels, cam, row["probability"], label, self.out_dir / name
        )


def write_rows(rows: Iterable[dict], output: str, stream: TextIO, columns: list[str]) -> bool:
    """Write each row as it comes (CSV, or a JSON list); True when any row has an error."""
    failed = False
    if output == "csv":
        writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
    else:
        stream.write("[")
    for index, row in enumerate(rows):
        failed |= "error" in row
        if output == "csv":
            writer.writerow(row)
        else:
            stream.write(("," if index else "") + "\n  " + json.dumps(row))
        stream.flush()
    if output != "csv":
        stream.write("\n]\n")
    return failed

"""`pneumo predict`: PNEUMONIA probability and label for image files and folders.

A model folder is loaded by :mod:`pneumo.core.runtime` alone, without MLflow, and with
``--runtime onnx`` (or ``auto`` where the folder has its ONNX graph) without torch, so one
image from a new process answers quickly. A ``models:/<name>@<alias>`` URI loads the
registered MLflow model (:mod:`pneumo.mlops.serving`), which wraps the same
:class:`~pneumo.core.runtime.Classifier`. Files are read, predicted and written a batch at a
time, so a folder of any size runs in bounded memory.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pneumo.core.images import IMAGE_SUFFIXES
from pneumo.core.runtime import Classifier
from pneumo.core.runtime import load_classifier as load_folder
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


def load_classifier(
    model: str | None,
    device: str,
    params: Callable[[], Params],
    runtime: str = "auto",
    quick_start: bool = False,
) -> Classifier:
    """A model folder, or a registry URI (default ``models:/<registry.model_name>@champion``),
    answered by ``runtime`` (:func:`pneumo.core.runtime.load_classifier`).

    ``params`` is called only for the registry, which needs the tracking settings: a model
    folder predicts anywhere, without params.yaml.
    """
    if model and not model.startswith("models:/"):
        return load_folder(Path(model), runtime, device, quick_start=quick_start)
    import mlflow

    from pneumo.mlops import registered, store

    settings = params()
    store.configure(settings.tracking)
    uri = model or f"models:/{settings.registry.model_name}@champion"
    try:
        # Its files are checked against the registration before MLflow imports any of them
        loaded = registered.load(uri, {"inference_device": device, "runtime": runtime})
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
    batch_size: int = 32,
    workers: int = 1,
) -> Iterator[dict]:
    """Rows in file order with a progress bar (images per second) on stderr; with
    ``explain_dir``, a Grad-CAM PNG per predicted image (named in the row's
    ``explanation``); ``allow_ood`` labels the inputs the gate flags, too; ``workers``
    threads decode the next ``batch_size`` images while the network runs."""
    from tqdm import tqdm

    explanations = Explanations(classifier, explain_dir) if explain_dir else None
    with tqdm(
        total=len(files), unit="img", file=sys.stderr, disable=len(files) < PROGRESS_FROM
    ) as progress:
        for row in classifier.predict_files(files, batch_size, allow_ood, workers):
            if explanations is not None and "error" not in row:
                row["explanation"] = str(explanations.write(Path(row["file"]), row))
            progress.update()
            yield row


class Explanations:
    """Grad-CAM figures of predicted files, ``<file stem>.png`` in one folder (numbered when
    two inputs share a name), for the layer chosen for the model's backbone and image size."""

    def __init__(self, classifier: Classifier, out_dir: Path) -> None:
        from pneumo.core import explain

        if classifier.runtime != "torch":
            raise PredictError("Grad-CAM (--explain) needs the network in torch: --runtime torch")
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


class PredictionFile:
    """``--out``: a CSV file, or a Parquet data set (a folder of ``part-NNNNN.parquet`` files
    that pandas and pyarrow read as one table), written as the rows come so a killed run
    keeps what it finished; ``resume`` continues it (:meth:`done` names the files to skip).

    A CSV row is written whole and flushed; a half-written last line is cut on resume. A
    Parquet part is renamed into place once complete, so a killed run loses at most the rows
    of the part it was filling.
    """

    PART_ROWS = 5000

    def __init__(self, path: Path, columns: list[str], resume: bool) -> None:
        self.path, self.columns, self.resume = path, columns, resume
        self.parquet = path.suffix == ".parquet"
        if not self.parquet and path.suffix != ".csv":
            raise PredictError(f"--out {path}: name a .csv file or a .parquet folder")
        if self.parquet:
            self._pyarrow()
        if path.exists() and path.is_dir() != self.parquet:
            kind = "a folder" if path.is_dir() else "a file"
            raise PredictError(f"--out {path} is {kind}: choose another name")
        if self.parquet and path.is_dir():
            strangers = [item.name for item in path.iterdir() if not self._is_part(item)]
            if strangers:
                raise PredictError(
                    f"--out {path} holds files that are not prediction parts "
                    f"({', '.join(sorted(strangers)[:3])}): choose another folder"
                )

    @staticmethod
    def _is_part(item: Path) -> bool:
        name = item.name.removeprefix(".").removesuffix(".tmp")
        return name.startswith("part-") and name.endswith(".parquet")

    def _pyarrow(self):
        try:
            import pyarrow
            import pyarrow.parquet
        except ModuleNotFoundError:
            raise PredictError(
                f"--out {self.path}: Parquet needs pyarrow (pip install pyarrow), or write .csv"
            ) from None
        return pyarrow

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def done(self) -> set[str]:
        """The files an earlier run already answered (empty unless resuming)."""
        if not (self.resume and self.path.exists()):
            return set()
        if self.parquet:
            pa = self._pyarrow()
            return {
                file for part in self._parts()
                for file in pa.parquet.read_table(part, columns=["file"])["file"].to_pylist()
            }  # fmt: skip
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-row
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        reader = csv.DictReader(io.StringIO(data.decode()))
        if data and reader.fieldnames != self.columns:
            raise PredictError(
                f"{self.path} has columns {reader.fieldnames}, not {self.columns}: it is not "
                "this command's output; choose another --out or drop --skip-done"
            )
        return {row["file"] for row in reader}

    def write(self, rows: Iterable[dict]) -> tuple[int, bool]:
        """Write ``rows`` (an earlier run's output is replaced unless resuming, once the
        first row is ready: a model that fails to load leaves it as it was); the number
        written and whether any has an error."""
        if self.parquet:
            return self._write_parquet(rows)
        written, failed = 0, False
        for row in rows:
            if written == 0:
                fresh = not self.resume or not self.path.exists() or not self.path.stat().st_size
                stream = self.path.open("w" if fresh else "a", newline="")
                writer = csv.DictWriter(stream, fieldnames=self.columns, lineterminator="\n")
                if fresh:
                    writer.writeheader()
            writer.writerow(row)
            stream.flush()
            written, failed = written + 1, failed or "error" in row
        if written:
            stream.close()
        return written, failed

    def _write_parquet(self, rows: Iterable[dict]) -> tuple[int, bool]:
        pa = self._pyarrow()
        text, number = pa.string(), pa.float64()
        types = {"probability": number, "gate_score": number, "in_distribution": pa.bool_()}
        schema = pa.schema([(name, types.get(name, text)) for name in self.columns])
        pending: list[dict] = []
        written, failed, index = 0, False, None

        def flush() -> None:
            nonlocal index
            if index is None:  # the first part: an earlier run's go unless resuming
                self.path.mkdir(parents=True, exist_ok=True)
                if not self.resume:
                    for item in self.path.iterdir():
                        item.unlink()
                numbers = [int(part.stem.removeprefix("part-")) for part in self._parts()]
                index = max(numbers, default=-1) + 1
            part = self.path / f"part-{index:05d}.parquet"
            partial = part.with_name(f".{part.name}.tmp")
            pa.parquet.write_table(pa.Table.from_pylist(pending, schema=schema), partial)
            os.replace(partial, part)
            index += 1
            pending.clear()

        for row in rows:
            pending.append({name: row.get(name) for name in self.columns})
            written, failed = written + 1, failed or "error" in row
            if len(pending) == self.PART_ROWS:
                flush()
        if pending:
            flush()
        return written, failed


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

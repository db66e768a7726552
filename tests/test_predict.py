"""`pneumo predict`: unusable models and inputs refused with one line before loading anything;
folders of any size streamed out, in decoding threads, and resumed after a kill."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import jpeg_bytes, run_cli, write_tree


def test_predict_with_a_missing_model_folder_says_what_to_pass(in_tmp):
    image = write_tree(in_tmp, {"scan.jpeg": jpeg_bytes(1)}) / "scan.jpeg"
    result = run_cli("predict", "--model", "models/nonexistent", str(image), params={})
    assert result.exit_code == 1
    assert result.output.startswith("Error: models/nonexistent is not a model folder")
    assert "--model models/<backbone>" in result.output and "Traceback" not in result.output


def test_predict_on_a_folder_without_images_fails(in_tmp):
    folder = write_tree(in_tmp / "scans", {"notes.txt": b"no images here"})
    result = run_cli("predict", str(folder), "--model", "models/resnet50", params={})
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {folder} holds no image files (looked for .bmp")


# --- batches of files: streaming out, resuming a killed run ------------------------------------


def _scans(project, count: int) -> list[str]:
    import pandas as pd

    images = pd.read_csv(project / "reports/eval/resnet50/predictions.csv").image[:count]
    return [str(project / "data/raw" / image) for image in images]


def _predict(*args: str):
    return run_cli("predict", "--model", MODEL, "--batch-size", "8", *args)


MODEL = "models/resnet50"


def test_decoding_threads_give_the_rows_one_thread_gives(project_copy):
    files = _scans(project_copy, 30) + ["missing.jpeg"]
    (project_copy / "missing.jpeg").write_bytes(b"not an image")
    alone = _predict("--workers", "1", *files)
    threaded = _predict("--workers", "3", *files)
    assert alone.exit_code == threaded.exit_code == 1  # the unreadable file
    assert threaded.stdout == alone.stdout
    assert alone.stdout.count("\n") == 32  # header and one row per file, in order


def test_a_killed_csv_run_continues_without_repeating_finished_rows(project_copy):
    import pandas as pd

    files = _scans(project_copy, 30)
    whole = _predict("--out", "whole.csv", *files)
    assert whole.exit_code == 0, whole.output
    expected = (project_copy / "whole.csv").read_text()
    # As a kill leaves it: 11 rows written, the 12th cut halfway.
    lines = expected.splitlines(keepends=True)
    (project_copy / "run.csv").write_text("".join(lines[:12]) + lines[12][:20])
    resumed = _predict("--out", "run.csv", "--skip-done", *files)
    assert resumed.exit_code == 0, resumed.output
    assert "11 files already in run.csv: 19 to go" in resumed.stderr
    assert "wrote 19 rows to run.csv" in resumed.stderr
    # The resumed rows come in other batches of 8, and oneDNN's kernels may round a batch's
    # scores differently in float32's last bits: same rows, same order, scores within 1e-5.
    run = pd.read_csv(project_copy / "run.csv")
    pd.testing.assert_frame_equal(run, pd.read_csv(project_copy / "whole.csv"), rtol=1e-5)
    assert run.file.is_unique


def test_parquet_output_is_a_data_set_that_resumes_by_part(project_copy, monkeypatch):
    import pandas as pd

    from pneumo.mlops.predict import PredictionFile

    monkeypatch.setattr(PredictionFile, "PART_ROWS", 8)
    files = _scans(project_copy, 20)
    assert _predict("--out", "rows.csv", *files).exit_code == 0
    assert _predict("--out", "rows.parquet", *files).exit_code == 0
    parts = sorted((project_copy / "rows.parquet").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-0000{i}.parquet" for i in range(3)]
    table = pd.read_parquet(project_copy / "rows.parquet")
    expected = pd.read_csv(project_copy / "rows.csv")
    pd.testing.assert_frame_equal(
        table[expected.columns].reset_index(drop=True), expected, check_dtype=False
    )
    parts[-1].unlink()  # killed while filling the third part: its rows were never renamed in
    resumed = _predict("--out", "rows.parquet", "--skip-done", *files)
    assert "16 files already in rows.parquet: 4 to go" in resumed.stderr
    again = pd.read_parquet(project_copy / "rows.parquet")
    assert sorted(again.file) == sorted(expected.file)


def test_skip_done_needs_an_out_file_and_out_needs_a_known_format(project_copy):
    files = _scans(project_copy, 1)
    result = _predict("--skip-done", *files)
    assert result.exit_code == 1 and "pass --out too" in result.output
    result = _predict("--out", "rows.txt", *files)
    assert result.exit_code == 1 and "name a .csv file or a .parquet folder" in result.output
    (project_copy / "other.csv").write_text("a,b\n1,2\n")
    result = _predict("--out", "other.csv", "--skip-done", *files)
    assert result.exit_code == 1 and "is not this command's output" in result.output
    (project_copy / "file.parquet").write_text("not a folder")
    result = _predict("--out", "file.parquet", *files)
    assert result.exit_code == 1 and "file.parquet is a file: choose another name" in result.output
    (project_copy / "mine.parquet").mkdir()
    (project_copy / "mine.parquet/notes.txt").write_text("keep me")
    result = _predict("--out", "mine.parquet", *files)
    assert result.exit_code == 1 and "holds files that are not prediction parts" in result.output
    assert (project_copy / "mine.parquet/notes.txt").read_text() == "keep me"


def test_explaining_needs_torch_and_says_so_before_any_row(project_copy):
    result = _predict("--runtime", "onnx", "--explain", "cams", *_scans(project_copy, 1))
    assert result.exit_code == 1 and result.stdout == ""
    assert "--explain (Grad-CAM) needs the network's gradients: --runtime torch" in result.output


# Runs `pneumo predict` with Python's allocations traced from the first row on: the peak is what
# streaming the files holds (rows, pixels as NumPy arrays), apart from the model and the list of
# paths. The process's peak RSS cannot show it: loading the model sets that peak before the first
# image, and it moved by 16 MiB between runs of the same code (CI, 2026-12-07), while a kept row
# per file moved it by nothing. The model runs in ONNX Runtime (what auto picks here), whose
# outputs are NumPy arrays; torch's own tensors would not be traced.
STREAMED = """
import sys, tracemalloc
from pneumo.cli import main
from pneumo.mlops import predict

stream = predict.predict_files


def traced(*args, **kwargs):
    tracemalloc.start()
    yield from stream(*args, **kwargs)


predict.predict_files = traced
try:
    main(sys.argv[1:])
except SystemExit as done:
    assert not done.code, done.code
print("streamed peak", tracemalloc.get_traced_memory()[1])
"""


def _streamed_peak_mib(project, folder, count: int) -> float:
    """Peak of the memory `pneumo predict` allocates while streaming ``count`` generated
    images to --out."""
    from scripts.benchmark_scale import radiograph_like

    folder.mkdir()
    for i in range(count):
        (folder / f"{i:05d}.jpeg").write_bytes(radiograph_like(i, size=64))
    out = folder.with_suffix(".csv")
    done = subprocess.run(
        [sys.executable, "-c", STREAMED, "predict", "--model", str(project / MODEL),
         "--out", str(out), str(folder)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text().count("\n") == count + 1
    return int(re.search(r"streamed peak (\d+)", done.stdout)[1]) / 2**20


@pytest.mark.slow
@pytest.mark.scenario
def test_predict_memory_does_not_grow_with_the_number_of_images(tiny_project, tmp_path):
    small = _streamed_peak_mib(tiny_project, tmp_path / "small", 1000)
    large = _streamed_peak_mib(tiny_project, tmp_path / "large", 6000)
    # Rows go to the file as they come and two batches of pixels are in memory: measured 1.9 MiB
    # for both counts, 0.13 MiB apart. Keeping each row adds 2.5 MiB per 5,000 files.
    assert large - small < 1, (small, large)

"""`pneumo predict` refuses unusable models and inputs with one line, before loading anything."""

from __future__ import annotations

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

"""Stage `fetch`: sources, layouts, archives and their failures."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pneumo.config import DataConfig
from pneumo.fetch import FetchError, fetch, patient_id
from tests.conftest import jpeg_bytes, kaggle_files, run_cli, write_tree


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1493_virus_2598.jpeg", "person1493"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0427-0001.jpeg", "NORMAL2-IM-0427"),
        ("odd-name.png", "odd-name"),
    ],
)
def test_patient_id_from_kaggle_names(name, patient):
    assert patient_id(name) == patient


def _local(path: Path) -> DataConfig:
    return DataConfig(source="local", local_path=str(path))


def test_folder_with_nested_copy_and_macos_debris(tmp_path):
    files = kaggle_files("chest_xray")
    nested = {f"chest_xray/{k}": v for k, v in kaggle_files("chest_xray").items()}
    debris = {
        "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg": b"\x00junk",
        "chest_xray/.DS_Store": b"junk",
        "chest_xray/train/NORMAL/.DS_Store": b"junk",
    }
    source = write_tree(tmp_path / "src", {**files, **nested, **debris})
    manifest = fetch(_local(source), tmp_path / "raw", seed=0)
    assert len(manifest) == len(files)
    assert set(manifest.split) == {"train", "val", "test"}
    assert (tmp_path / "raw/manifest.csv").is_file()
    on_disk = pd.read_csv(tmp_path / "raw/manifest.csv")
    assert list(on_disk.columns) == [
        "path",
        "split",
        "label",
        "patient",
        "sha256",
        "width",
        "height",
        "mode",
    ]
    first = on_disk.iloc[0]
    assert (tmp_path / "raw" / first.path).is_file()
    assert first.width == 48 and first["mode"] == "L"


def test_zip_source_matches_folder_source(tmp_path):
    files = kaggle_files()
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        zf.writestr("__MACOSX/chest_xray/._x", b"junk")
    from_zip = fetch(_local(archive), tmp_path / "raw_zip", seed=0)
    from_dir = fetch(_local(write_tree(tmp_path / "dir", files)), tmp_path / "raw_dir", seed=0)
    pd.testing.assert_frame_equal(from_zip, from_dir)


@pytest.mark.parametrize("evil", ["../escape.jpeg", "/etc/evil.jpeg", "chest_xray/../../x.jpeg"])
def test_zip_entries_escaping_the_target_are_refused(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in kaggle_files().items():
            zf.writestr(rel, data)
        zf.writestr(evil, jpeg_bytes(0))
    with pytest.raises(FetchError, match="outside the target folder"):
        fetch(_local(archive), tmp_path / "raw", seed=0)
    assert not (tmp_path / "raw").exists()
    assert list(tmp_path.iterdir()) == [archive]


def test_wrong_layout_lists_what_was_found(tmp_path):
    source = write_tree(tmp_path / "src", {"images/cat.jpeg": jpeg_bytes(1), "notes.txt": b"x"})
    with pytest.raises(FetchError, match=r"Kaggle layout.*found 2 files.*'images', 'notes.txt'"):
        fetch(_local(source), tmp_path / "raw", seed=0)


def test_layout_without_a_class_is_refused(tmp_path):
    files = {k: v for k, v in kaggle_files().items() if "/test/NORMAL/" not in k}
    with pytest.raises(FetchError, match="lacks.*test/NORMAL"):
        fetch(_local(write_tree(tmp_path / "src", files)), tmp_path / "raw", seed=0)


def test_missing_local_path(tmp_path):
    with pytest.raises(FetchError, match="does not exist"):
        fetch(_local(tmp_path / "nope.zip"), tmp_path / "raw", seed=0)


def test_missing_kaggle_credentials_say_what_to_set(in_tmp, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(in_tmp / "no-kaggle"))
    result = run_cli("fetch", params={"data": {"source": "kaggle"}})
    assert result.exit_code == 1
    assert "KAGGLE_USERNAME" in result.output and "data.source=local" in result.output
    assert not (in_tmp / "data/raw").exists()


def test_interrupted_fetch_keeps_the_previous_raw_data_and_leaves_no_debris(tmp_path, monkeypatch):
    source = write_tree(tmp_path / "src", kaggle_files())
    fetch(_local(source), tmp_path / "data/raw", seed=0)
    before = sorted((tmp_path / "data").rglob("*"))
    calls = iter(range(10**6))

    def dies_halfway(data: bytes):
        if next(calls) == 5:
            raise KeyboardInterrupt
        return 1, 1, "L"

    monkeypatch.setattr("pneumo.fetch._describe_image", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        fetch(_local(source), tmp_path / "data/raw", seed=0)
    assert sorted((tmp_path / "data").rglob("*")) == before

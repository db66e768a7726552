"""Stage `fetch` and the sources it reads (pneumo.core.sources): layouts, archives, external
sets and their failures."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pneumo.config import DataConfig, ExternalSet, ZipLimits
from pneumo.core.sources import (
    EXTERNAL_SPLIT,
    MB,
    FetchError,
    ReadBudget,
    external_entries,
    patient_id,
)
from pneumo.stages.fetch import fetch
from tests.conftest import jpeg_bytes, kaggle_files, run_cli, write_tree


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1_bacteria"),
        ("person1493_virus_2598.jpeg", "person1493_virus"),
        ("person447_virus_921_1.jpeg", "person447_virus"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0427-0001.jpeg", "NORMAL2-IM-0427"),
        ("odd-name.png", "odd-name"),
    ],
)
def test_patient_id_from_kaggle_names(name, patient):
    assert patient_id(name) == patient


def test_person_numbers_count_per_category():
    """person12_bacteria and person12_virus are two patients; two images of one are one."""
    assert patient_id("person12_bacteria_57.jpeg") != patient_id("person12_virus_39.jpeg")
    assert patient_id("person12_virus_39.jpeg") == patient_id("person12_virus_40.jpeg")
    assert patient_id("IM-0115-0001.jpeg") != patient_id("NORMAL2-IM-0115-0001.jpeg")


def _local(path: Path, **limits: float) -> DataConfig:
    return DataConfig(source="local", local_path=str(path), limits=ZipLimits(**limits))


def _archive(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, data in (kaggle_files() | (extra or {})).items():
            zf.writestr(rel, data)
    return path


def _zeros_entry(archive: Path, name: str, megabytes: int) -> None:
    """Append an entry of zeros, streamed: it deflates about a thousandfold."""
    with (
        zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open(name, "w", force_zip64=True) as entry,
    ):
        for _ in range(megabytes):
            entry.write(bytes(MB))


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
    assert first.width == 64 and first["mode"] == "L"


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

    monkeypatch.setattr("pneumo.stages.fetch._describe_image", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        fetch(_local(source), tmp_path / "data/raw", seed=0)
    assert sorted((tmp_path / "data").rglob("*")) == before


def test_zip_with_a_corrupted_entry_is_reported_as_damaged(in_tmp):
    image = jpeg_bytes(77)
    archive = in_tmp / "data.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel, data in kaggle_files().items():
            zf.writestr(rel, data)
        zf.writestr("chest_xray/train/NORMAL/IM-0777-0001.jpeg", image)
    raw = bytearray(archive.read_bytes())
    raw[raw.index(image) + len(image) // 2] ^= 0xFF  # the CRC no longer matches
    archive.write_bytes(bytes(raw))
    result = run_cli("fetch", params={"data": {"source": "local", "local_path": str(archive)}})
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("Error: ") and "damaged .zip archive" in error
    assert "IM-0777-0001.jpeg" in error and "Traceback" not in result.output
    assert not (in_tmp / "data/raw").exists()


def test_truncated_zip_is_reported_as_damaged(in_tmp):
    archive = _archive(in_tmp / "data.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    result = run_cli("fetch", params={"data": {"source": "local", "local_path": str(archive)}})
    assert result.exit_code == 1
    assert "damaged .zip archive" in result.output and "truncated" in result.output
    assert "Traceback" not in result.output


def test_small_zip_unpacking_to_a_huge_entry_is_refused(in_tmp):
    archive = _archive(in_tmp / "bomb.zip")
    _zeros_entry(archive, "chest_xray/train/NORMAL/IM-0999-0001.jpeg", megabytes=256)
    assert archive.stat().st_size < 2 * MB
    result = run_cli("fetch", params={"data": {"source": "local", "local_path": str(archive)}})
    assert result.exit_code == 1
    assert "data.limits.max_entry_mb=64" in result.output and "refusing" in result.output
    assert not (in_tmp / "data/raw").exists()


def test_highly_compressed_entry_is_refused(tmp_path):
    archive = _archive(tmp_path / "bomb.zip")
    _zeros_entry(archive, "chest_xray/notes/padding.bin", megabytes=8)
    with pytest.raises(FetchError, match=r"compressed \d+:1.*data\.limits\.max_compression_ratio"):
        fetch(_local(archive), tmp_path / "raw", seed=0)


def test_archive_unpacking_to_more_than_the_total_limit_is_refused(tmp_path):
    archive = _archive(tmp_path / "data.zip")
    with pytest.raises(FetchError, match=r"data\.limits\.max_total_mb=0\.1"):
        fetch(_local(archive, max_total_mb=0.1), tmp_path / "raw", seed=0)
    assert len(fetch(_local(archive, max_total_mb=5), tmp_path / "raw", seed=0)) > 0


class _LyingArchive:
    """Stands in for a zip reader that trusts local headers and yields more than declared."""

    def open(self, info: zipfile.ZipInfo) -> io.BytesIO:
        return io.BytesIO(bytes(3 * MB))


def test_reads_stop_at_the_limits_whatever_the_archive_declares(tmp_path):
    declared = zipfile.ZipInfo("chest_xray/train/NORMAL/IM-0001-0001.jpeg")
    declared.file_size = 100
    budget = ReadBudget(ZipLimits(max_entry_mb=1))
    with pytest.raises(FetchError, match=r"more than data\.limits\.max_entry_mb=1 "):
        budget.read(tmp_path / "a.zip", _LyingArchive(), declared)
    total = ReadBudget(ZipLimits(max_entry_mb=4, max_total_mb=5))
    assert len(total.read(tmp_path / "a.zip", _LyingArchive(), declared)) == 3 * MB
    with pytest.raises(FetchError, match=r"data\.limits\.max_total_mb=5 "):
        total.read(tmp_path / "a.zip", _LyingArchive(), declared)


@pytest.mark.parametrize("target", ["file", "folder"])
def test_symbolic_links_in_a_source_folder_are_refused(tmp_path, target):
    source = write_tree(tmp_path / "src", kaggle_files())
    outside = write_tree(tmp_path / "outside", {"secret.jpeg": jpeg_bytes(5)})
    link = source / "chest_xray/train/NORMAL" / ("IM-0888-0001.jpeg" if target == "file" else "x")
    link.symlink_to(outside / "secret.jpeg" if target == "file" else outside)
    with pytest.raises(FetchError, match=r"1 symbolic links, which fetch does not follow.*NORMAL"):
        fetch(_local(source), tmp_path / "raw", seed=0)
    assert not (tmp_path / "raw").exists()


# --- external sets -------------------------------------------------------------------------


def _external(path: Path) -> list:
    return external_entries(ExternalSet(name="site", path=str(path)), ZipLimits())


def test_an_external_folder_pools_every_split_and_ignores_nested_copies_and_debris(tmp_path):
    files = kaggle_files("chest_xray")
    nested = {f"chest_xray/{k}": v for k, v in files.items()}
    debris = {"__MACOSX/chest_xray/test/NORMAL/._a.jpeg": b"x", "chest_xray/.DS_Store": b"x"}
    entries = _external(write_tree(tmp_path / "src", {**files, **nested, **debris}))
    assert len(entries) == len(files)
    assert {e.split for e in entries} == {EXTERNAL_SPLIT}
    labels = sorted((e.label, e.name) for e in entries)
    assert labels == sorted((k.split("/")[-2], k.split("/")[-1]) for k in files)


def test_an_external_zip_with_class_folders_at_the_top_reads_like_the_folder(tmp_path):
    files = {"NORMAL/a.jpeg": jpeg_bytes(1), "PNEUMONIA/b.png": jpeg_bytes(2, mode="RGB")}
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    from_zip = [(e.label, e.name, e.read()) for e in _external(archive)]
    from_dir = [(e.label, e.name, e.read()) for e in _external(write_tree(tmp_path / "d", files))]
    assert from_zip == from_dir == [("NORMAL", "a.jpeg", files["NORMAL/a.jpeg"]),
                                    ("PNEUMONIA", "b.png", files["PNEUMONIA/b.png"])]  # fmt: skip


def test_an_external_csv_names_files_relative_to_itself_with_labels_or_zero_one(tmp_path):
    write_tree(tmp_path / "imgs", {"x.jpeg": jpeg_bytes(1), "y.jpeg": jpeg_bytes(2)})
    table = tmp_path / "labels.csv"
    table.write_text("path,label,site\nimgs/x.jpeg,0,a\nimgs/y.jpeg,pneumonia,a\n")
    entries = _external(table)
    assert [(e.label, e.name) for e in entries] == [("NORMAL", "x.jpeg"), ("PNEUMONIA", "y.jpeg")]
    assert entries[1].read() == jpeg_bytes(2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,class\nimgs/x.jpeg,0\n", "needs the columns path,label"),
        ("path,label\nimgs/x.jpeg,maybe\n", r"NORMAL/PNEUMONIA or 0/1, found \['MAYBE'\]"),
        ("path,label\nimgs/gone.jpeg,1\n", "1 files that do not exist.*gone.jpeg"),
    ],
)
def test_a_wrong_external_csv_says_what_is_wrong_before_reading_any_image(tmp_path, text, message):
    write_tree(tmp_path / "imgs", {"x.jpeg": jpeg_bytes(1)})
    table = tmp_path / "labels.csv"
    table.write_text(text)
    with pytest.raises(FetchError, match=message):
        _external(table)


def test_an_external_folder_without_class_folders_is_refused(tmp_path):
    source = write_tree(tmp_path / "src", {"images/cat.jpeg": jpeg_bytes(1)})
    with pytest.raises(FetchError, match="no images in NORMAL/ or PNEUMONIA/ folders"):
        _external(source)
    with pytest.raises(FetchError, match="does not exist"):
        _external(tmp_path / "nowhere")

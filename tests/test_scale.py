"""Real-scale training: memory that stays flat, batch augmentation, samplers, resume, torchrun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import yaml
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode

from pneumo.config import AugmentConfig, ConfigError, parse_params
from pneumo.core.data import (
    BalancedSampler,
    BatchAugmentation,
    CachedSplit,
    CacheLoader,
    affine_theta,
    train_sampler,
)
from pneumo.stages.preprocess import write_array
from tests.conftest import (
    TINY_PARAMS,
    kill_after_first_epoch,
    pneumo_process,
    state_epoch,
    tool_env,
    tracked_runs,
    wait_for_epoch,
    write_params,
)


def _preprocess_peak_mib(project: Path, images: int) -> float:
    """Peak RSS of the process that runs `pneumo preprocess` (decoding runs in a worker),
    measured as the scale benchmark measures it, on the benchmark's generated images."""
    from scripts.benchmark_scale import run_stage, write_folder

    project.mkdir()
    source = write_folder(project / "source", images)
    params = {
        "data": {"source": "local", "local_path": str(source), "image_size": 256},
        "tracking": {"experiment": "tests"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(project, "fetch")
    _, peak = run_stage(project, "preprocess", "--workers", "1")
    counts = json.loads((project / "data/processed/report.json").read_text())["cached_images"]
    assert counts == images
    return peak


@pytest.mark.slow
def test_preprocess_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = _preprocess_peak_mib(tmp_path / "small", 400)
    large = _preprocess_peak_mib(tmp_path / "large", 1600)
    # 1,200 more images of 256x256 are 79 MB of pixels: holding them (twice, as the
    # previous cache writer did) would add well over 100 MB.
    assert large - small < 30, (small, large)


def test_cache_arrays_are_written_row_by_row_as_numpy_would(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    rows.tofile(tmp_path / "rows.u8")
    picks = np.array([7, 2, 2, 9])
    write_array(tmp_path / "rows.u8", picks, 8, tmp_path / "picked.npy")
    np.save(tmp_path / "reference.npy", rows[picks])
    assert (tmp_path / "picked.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()


RECIPE = AugmentConfig(
    rotation=15, hflip=True, translate=0.1, brightness=0.2, contrast=0.2, blur_sigma=1.0,
    crop_scale=0.8,
)  # fmt: skip


def _gradient_batch(n: int, size: int = 32) -> torch.Tensor:
    row = torch.linspace(0, 255, size).to(torch.uint8)
    return row.repeat(n, 1, size, 1)  # a left-to-right ramp: flips and shifts show


def test_batch_augmentation_draws_its_parameters_per_sample():
    torch.manual_seed(0)
    out = BatchAugmentation(RECIPE)(_gradient_batch(16))
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    flat = out.flatten(1)
    distinct = {tuple(row.round().tolist()) for row in flat}
    assert len(distinct) == 16  # identical inputs, sixteen different outputs


def test_batch_augmentation_repeats_with_the_seed_and_is_off_when_switched_off():
    batch = _gradient_batch(8)
    augment = BatchAugmentation(RECIPE)
    torch.manual_seed(1)
    first = augment(batch)
    torch.manual_seed(1)
    assert torch.equal(first, augment(batch))
    off = AugmentConfig(
        rotation=0, hflip=False, translate=0, brightness=0, contrast=0, crop_scale=1.0
    )
    assert torch.equal(BatchAugmentation(off)(batch), batch)


def test_each_augmentation_has_the_recipe_semantics_per_sample():
    batch = _gradient_batch(256)
    torch.manual_seed(2)
    flip = AugmentConfig(rotation=0, hflip=True, translate=0, brightness=0, contrast=0,
                         crop_scale=1.0)  # fmt: skip
    flipped = BatchAugmentation(flip)(batch)
    mirrored = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, -1]).float().mean()
    assert 0.35 < mirrored < 0.65  # p = 0.5, drawn per image
    bright = AugmentConfig(rotation=0, hflip=False, translate=0, brightness=0.2, contrast=0,
                           crop_scale=1.0)  # fmt: skip
    ratio = BatchAugmentation(bright)(batch).mean((1, 2, 3)) / batch.float().mean()
    assert ratio.min() > 0.79 and ratio.max() < 1.21  # factor in [0.8, 1.2] ...
    assert ratio.std() > 0.05  # ... drawn for each image, not once per batch


def _one_pass(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, degrees: float,
              shift: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """pneumo's single resampling, from parameters in torchvision's pixel units."""
    side = image.shape[-1]
    top, left, height, width = box
    crop = torch.tensor([[(2 * left + width) / side - 1, (2 * top + height) / side - 1,
                          width / side, height / side]])  # fmt: skip
    theta = affine_theta(crop, torch.tensor([-1.0 if flip else 1.0]),
                         torch.tensor([math.radians(degrees)]),
                         torch.tensor([shift]) * 2 / side)  # fmt: skip
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _one_after_another(image, box, flip, degrees, shift) -> torch.Tensor:
    """The same transforms applied one after another by torchvision."""
    side = image.shape[-1]
    out = TF.resized_crop(image, *box, [side, side], antialias=False)
    out = TF.horizontal_flip(out) if flip else out
    out = TF.rotate(out, degrees, interpolation=InterpolationMode.BILINEAR)
    return TF.affine(out, angle=0.0, translate=list(shift), scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR)  # fmt: skip


@pytest.mark.parametrize(
    "box, flip, degrees, shift",
    [
        ((8, 16, 40, 32), False, 0.0, (0.0, 0.0)),
        ((8, 16, 40, 32), True, 0.0, (0.0, 0.0)),
        ((0, 0, 64, 64), False, 30.0, (0.0, 0.0)),
        ((0, 0, 64, 64), False, 0.0, (6.0, -10.0)),
        ((8, 16, 40, 32), True, 25.0, (5.0, -7.0)),
        ((10, 4, 30, 50), True, -40.0, (-8.0, 3.0)),
    ],
)
def test_one_affine_pass_equals_the_transforms_one_after_another(box, flip, degrees, shift):
    rows, columns = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64),
                                   indexing="ij")  # fmt: skip
    smooth = (torch.sin(6 * columns) * torch.cos(4 * rows) + 0.3 * columns)[None, None]
    ours, theirs = (f(smooth, box, flip, degrees, shift) for f in (_one_pass, _one_after_another))
    ones = torch.ones_like(smooth)
    inside = (_one_pass(ones, box, flip, degrees, shift) > 0.999) & (
        _one_after_another(ones, box, flip, degrees, shift) > 0.999
    )
    assert inside.float().mean() > 0.3
    # one interpolation instead of up to four: close, not equal (the image spans 2.2)
    assert (ours - theirs)[inside].abs().max() < 0.05


def test_drawn_rotation_and_shift_cover_the_configured_ranges():
    torch.manual_seed(4)
    config = AugmentConfig(rotation=15, hflip=False, translate=0.1, brightness=0, contrast=0,
                           crop_scale=1.0)  # fmt: skip
    theta = BatchAugmentation(config).draw(4096)[:, :6].view(-1, 2, 3)
    degrees = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert 14.5 < degrees.abs().max() <= 15.0 + 1e-4
    shift = torch.linalg.solve(theta[:, :, :2], -theta[:, :, 2:]).squeeze(-1)  # output of 0
    in_pixels = shift * 224 / 2  # ±0.1 of a 224 px side is ±22.4 px
    assert 22.0 < in_pixels.abs().max() <= 22.4 + 1e-3


@pytest.mark.parametrize("crop_scale", [0.5, 0.9])
def test_the_crop_keeps_its_area_and_aspect_ratio_inside_the_image(crop_scale):
    torch.manual_seed(3)
    crop = AugmentConfig(rotation=0, hflip=False, translate=0, brightness=0, contrast=0,
                         crop_scale=crop_scale)  # fmt: skip
    theta = BatchAugmentation(crop).draw(4096)[:, :6].view(-1, 2, 3)
    half_w, half_h = theta[:, 0, 0], theta[:, 1, 1]
    assert (theta[:, 0, 2].abs() + half_w <= 1 + 1e-6).all()  # box inside: |centre| + half <= 1
    assert (theta[:, 1, 2].abs() + half_h <= 1 + 1e-6).all()
    area = half_w * half_h
    assert area.min() >= crop_scale - 1e-6 and area.max() <= 1.0 + 1e-6
    assert abs(area.mean().item() - (1 + crop_scale) / 2) < 0.01  # uniform in crop_scale..1
    ratio = half_w / half_h
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5


def test_balanced_sampler_shards_one_draw_between_processes():
    targets = np.array([0] * 30 + [1] * 90)
    single = BalancedSampler(targets, seed=5)
    shards = [BalancedSampler(targets, seed=5, rank=r, world=2) for r in range(2)]
    for sampler in (single, *shards):
        sampler.set_epoch(3)
    draws = list(single)
    assert sorted(draws) == sorted(list(shards[0]) + list(shards[1]))
    assert list(shards[0]) == draws[0::2] and list(shards[1]) == draws[1::2]
    assert abs(np.mean(targets[draws]) - 0.5) < 0.15  # classes drawn equally often
    single.set_epoch(4)
    assert list(single) != draws


def test_unbalanced_training_shuffles_anew_each_epoch():
    sampler = train_sampler(np.zeros(50, int), seed=1, balanced=False)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert sorted(first) == list(range(50)) and list(sampler) != first


def _numbered_split(rows: int) -> CachedSplit:
    """Rows whose pixels all hold the row's number, and alternating targets."""
    images = np.repeat(np.arange(rows, dtype=np.uint8), 15).reshape(rows, 3, 5)
    targets = np.arange(rows) % 2
    return CachedSplit(images, targets, pd.DataFrame({"index": range(rows)}))


@pytest.mark.parametrize("threads", [0, 3])
def test_the_cache_loader_yields_the_sampler_batches_in_order(threads):
    split = _numbered_split(50)
    sampler = train_sampler(split.targets, seed=2, balanced=True)
    loader = CacheLoader(split, batch_size=8, indices=sampler, threads=threads)
    assert len(loader) == 7
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        batches = list(loader)
        assert [len(pixels) for pixels, _ in batches] == [8] * 6 + [2]  # the last one short
        pixels = torch.cat([p for p, _ in batches])
        targets = torch.cat([t for _, t in batches])
        assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (1, 3, 5)
        assert pixels[:, 0, 0, 0].tolist() == drawn  # each row where the sampler put it
        assert (pixels == pixels[:, :, :1, :1]).all()
        assert targets.dtype == torch.float32 and targets.tolist() == [i % 2 for i in drawn]


def test_the_cache_loader_reads_every_row_in_order_by_default():
    loader = CacheLoader(_numbered_split(10), batch_size=4, threads=2)
    assert [p[:, 0, 0, 0].tolist() for p, _ in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_cache_is_mapped_read_only(tiny_project):
    """A writable private map would reserve the file's size in memory: a cache larger than
    RAM plus swap would not open."""
    split = CachedSplit.load(tiny_project / "data/processed", "train")
    assert isinstance(split.images, np.memmap) and not split.images.flags.writeable
    pixels, _ = next(iter(CacheLoader(split, batch_size=4, threads=1)))
    assert torch.equal(pixels[:, 0], torch.from_numpy(np.array(split.images[:4])))


def test_the_cache_loader_stops_its_threads_and_passes_on_read_errors():
    loader = CacheLoader(_numbered_split(40), batch_size=4, threads=2)
    for _ in loader:
        break  # a consumer that stops early, as training stopped by an error does
    assert not [t for t in threading.enumerate() if t.name.startswith("pneumo-loader")]
    broken = CacheLoader(_numbered_split(40), batch_size=4, indices=[0, 1, 2, 99], threads=2)
    with pytest.raises(IndexError):
        list(broken)


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"device": "gpu"}, "train.device"),
        ({"device": "cuda:x"}, "train.device"),
        ({"amp": True}, "train.amp"),
        ({"amp": "fp8"}, "train.amp"),
        ({"compile": "yes"}, "train.compile"),
        ({"num_workers": "many"}, "train.num_workers"),
        ({"nproc": 0}, "train.nproc"),
        ({"nproc": 3, "batch_size": 32}, "train"),
        ({"nproc": 2, "device": "cuda:1"}, "train"),
    ],
)
def test_invalid_device_settings_are_named(train, key):
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["train"] |= train
    with pytest.raises(ConfigError, match=rf"(?s){key}"):
        parse_params(raw)


def test_device_settings_are_in_the_schema():
    from pneumo.config import TrainConfig

    fields = TrainConfig.model_json_schema()["properties"]
    assert {"device", "amp", "compile", "num_workers", "resume", "nproc"} <= fields.keys()
    for device in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert parse_params({"train": {"device": device}}).train.device == device


# --- resume and torchrun: whole `pneumo train` processes on the tiny project ------------------


@pytest.mark.slow
def test_training_killed_after_an_epoch_resumes_to_the_identical_checkpoint(tiny_project, tmp_path):
    import shutil

    epochs = 4
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    for project in (uninterrupted, killed):
        shutil.copytree(tiny_project, project)
        shutil.rmtree(project / "checkpoints")
        (project / "mlflow.db").unlink()
        write_params(project, epochs=epochs, patience=epochs)
    assert pneumo_process("train", "resnet50", cwd=uninterrupted).wait() == 0

    kill_after_first_epoch(killed)
    stopped_after = state_epoch(killed)
    assert 1 <= stopped_after < epochs, "the kill came too late to test resuming"
    assert not (killed / "checkpoints/resnet50").exists()
    [interrupted] = tracked_runs(killed)
    assert interrupted.info.status == "RUNNING"  # what SIGKILL leaves behind

    rerun = pneumo_process("train", "resnet50", cwd=killed)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert f"resuming after epoch {stopped_after}" in output

    reference = torch.load(uninterrupted / "checkpoints/resnet50/model.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints/resnet50/model.pt", weights_only=True)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    for report in ("reports/history/resnet50.csv", "reports/train/resnet50/metrics.json"):
        assert (killed / report).read_text() == (uninterrupted / report).read_text()
    assert not list((killed / ".pneumo/resume").glob("*.pt"))  # finished: state removed

    runs = {run.info.run_id: run for run in tracked_runs(killed)}
    assert runs[interrupted.info.run_id].info.status == "KILLED"
    [resumed_run] = [run for run in runs.values() if run.info.status == "FINISHED"]
    assert resumed_run.data.tags["resumed_from_epoch"] == str(stopped_after)
    assert resumed_run.data.tags["resumed_from_run"] == interrupted.info.run_id
    history = mlflow.MlflowClient().get_metric_history(resumed_run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_state_from_other_settings_is_never_resumed(project_copy):
    write_params(project_copy, epochs=2, lr=0.01)
    kill_after_first_epoch(project_copy)
    write_params(project_copy, epochs=2, lr=0.002)
    rerun = pneumo_process("train", "resnet50", cwd=project_copy)
    output = rerun.communicate()[0]
    assert rerun.returncode == 0, output
    assert "resuming" not in output and "removing resume state of other settings" in output


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"registry": {"min_val_auc": 0.9}}, True),
        ({"backbones": ["resnet50"]}, True),
        ({"data": {"local_path": "elsewhere.zip"}}, True),  # the data hash decides
        ({"train": {"num_workers": 3}}, True),
        ({"train": {"resume": False}}, True),
        ({"train": {"device": "cpu"}}, True),  # the resolved device type is what counts
        ({"train": {"nproc": 2}}, True),  # and the actual number of processes
        ({"evaluate": {"tta": ["identity"]}}, True),
        ({"train": {"lr": 0.002}}, False),
        ({"evaluate": {"batch_size": 8}}, False),
        ({"augment": {"rotation": 5.0}}, False),
        ({"seed": 7}, False),
    ],
)
def test_the_resume_key_follows_what_determines_the_training(change, same):
    from pneumo.core.resume import run_key

    reference = run_key(parse_params({}), "resnet50", "abc", "cpu", 1)
    assert (run_key(parse_params(change), "resnet50", "abc", "cpu", 1) == reference) is same
    assert run_key(parse_params({}), "densenet121", "abc", "cpu", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abd", "cpu", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abc", "cuda", 1) != reference
    assert run_key(parse_params({}), "resnet50", "abc", "cpu", 2) != reference


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_trains_and_writes_once(tiny_project, tmp_path):
    import shutil

    results = {}
    for nproc in (1, 2):
        project = tmp_path / f"nproc{nproc}"
        shutil.copytree(tiny_project, project)
        shutil.rmtree(project / "checkpoints")
        (project / "mlflow.db").unlink()
        write_params(project, epochs=3, patience=3, nproc=nproc, device="cpu")
        done = pneumo_process("train", "resnet50", cwd=project)
        output = done.communicate(timeout=900)[0]
        assert done.returncode == 0, output
        assert [p.name for p in (project / "checkpoints").iterdir()] == ["resnet50"]
        assert list((project / "checkpoints/resnet50").glob("*.pt")) == [
            project / "checkpoints/resnet50/model.pt"
        ]
        [run] = tracked_runs(project)
        assert run.data.params["world_size"] == str(nproc)
        results[nproc] = json.loads((project / "reports/train/resnet50/metrics.json").read_text())
    # Same global batch, same draws: only BatchNorm sees per-process halves of each batch.
    assert results[2]["epochs_run"] == results[1]["epochs_run"]
    assert abs(results[2]["best_val_auc"] - results[1]["best_val_auc"]) < 0.2, results


@pytest.mark.slow
def test_a_killed_dvc_repro_continues_training_where_it_stopped(tmp_path):
    """The whole job killed mid-training (DVC and its stage); `dvc repro` resumes the stage."""
    from tests.conftest import copy_repository

    repo = copy_repository(tmp_path / "repo")
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["backbones"] = ["resnet50"]
    raw["train"] |= {"epochs": 4, "patience": 4}
    # Every key spelled out: DVC reads the params each stage declares from the file itself.
    (repo / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json")))
    env = tool_env()
    job = subprocess.Popen(
        ["dvc", "repro", "train@resnet50"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_epoch(repo, job, timeout=600)
    assert job.poll() is None, "dvc repro ended before its first epoch was saved"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    stopped_after = state_epoch(repo)
    assert 1 <= stopped_after < 4, "the kill came too late to test resuming"

    rerun = subprocess.run(
        ["dvc", "repro", "train@resnet50"], cwd=repo, env=env, capture_output=True, text=True
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output
    assert f"resuming after epoch {stopped_after}" in output
    assert "Running stage 'fetch'" not in output  # finished stages stay done
    history = (repo / "reports/history/resnet50.csv").read_text().splitlines()
    assert len(history) == 1 + 4

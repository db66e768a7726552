"""The input gate: probabilistic-PCA distances in feature and pixel space, their cuts, the
gate file, and the shifted inputs it is measured on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo.core import gate, graph, phantoms
from pneumo.core.models import build_model
from pneumo.files import sha256_of


def _spaces(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Features in 40 dimensions that vary along 3 directions, and pixel features."""
    loadings = np.random.default_rng(99).normal(size=(3, 40))
    features = rng.normal(size=(n, 3)) @ loadings + 0.05 * rng.normal(size=(n, 40)) + shift
    return {"features": features, "pixels": 0.1 * rng.normal(size=(n, 104)) + shift}


def test_the_cuts_flag_about_the_chosen_share_of_validation_and_every_far_input():
    rng = np.random.default_rng(0)
    train, val, test = _spaces(rng, 30), _spaces(rng, 400), _spaces(rng, 400)
    fitted = gate.fit(train, val, components=3, percentile=99)
    found = gate.distances(fitted, val)
    combined = np.maximum(found["features"], found["pixels"])
    assert (combined > 1).mean() == pytest.approx(0.01, abs=0.003)  # half of 1% per space
    held_out = gate.distances(fitted, test)
    assert (np.maximum(held_out["features"], held_out["pixels"]) > 1).mean() < 0.03
    far = gate.distances(fitted, _spaces(rng, 20, shift=1.0))
    assert (far["features"] > 1).all() and (far["pixels"] > 1).all()


def test_a_direction_training_never_varied_along_counts():
    """Off the principal directions the isotropic rest still measures the distance."""
    rng = np.random.default_rng(1)
    train, val = _spaces(rng, 30), _spaces(rng, 100)
    fitted = gate.fit(train, val, components=3, percentile=99)
    off = {name: values[:5].copy() for name, values in val.items()}
    off["features"][:, 7] += 5.0  # one coordinate far off, little along the loadings
    assert (gate.distances(fitted, off)["features"] > 1).all()


def test_pixel_features_are_histograms_and_a_thumbnail_in_any_chunking():
    images = np.random.default_rng(2).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    found = gate.pixel_features(images, chunk=2)
    thumbnail_end = gate.PIXEL_BINS + gate.THUMBNAIL**2
    assert found.shape == (5, thumbnail_end + len(gate.STEP_EDGES) - 1)
    assert np.allclose(found[:, : gate.PIXEL_BINS].sum(axis=1), 1.0)
    thumbnail = found[:, gate.PIXEL_BINS : thumbnail_end]
    assert np.allclose(thumbnail.mean(axis=1), images.mean(axis=(1, 2)) / 255)
    assert np.allclose(found[:, thumbnail_end:].sum(axis=1), 1.0)
    np.testing.assert_array_equal(found, gate.pixel_features(images, chunk=256))


def test_steps_between_neighbours_tell_noise_from_a_smooth_image():
    """Uniform noise steps by 85 grey levels on average, a phantom radiograph (with its own
    acquisition noise) mostly by less than 16."""
    noise = np.random.default_rng(5).integers(0, 256, (1, 64, 64), dtype=np.uint8)
    smooth = phantoms.phantom(0, 0, 64, pneumonia=False)[None]
    noisy, calm = (gate.pixel_features(x)[0, -8:] for x in (noise, smooth))
    assert noisy[-3:].sum() > 0.7  # 32 grey levels or more
    assert calm[-3:].sum() < 0.15 and calm[:4].sum() > 0.7


def test_the_thumbnail_is_adaptive_average_pooling():
    images = np.random.default_rng(6).integers(0, 256, (3, 44, 44), dtype=np.uint8)  # 44 % 8 != 0
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images).double()[:, None], 8)
    thumbnail = gate.pixel_features(images)[:, gate.PIXEL_BINS : gate.PIXEL_BINS + 64]
    np.testing.assert_allclose(thumbnail, pooled.flatten(1).numpy() / 255, atol=1e-12)


def test_the_gate_file_is_the_same_bytes_for_the_same_arrays(tmp_path):
    rng = np.random.default_rng(3)
    fitted = gate.fit(_spaces(rng, 20), _spaces(rng, 20), components=2, percentile=99)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    digests = [gate.save(fitted, tmp_path / name) for name in ("a", "b")]
    assert digests[0] == digests[1] == sha256_of(tmp_path / "a/gate.npz")
    loaded = gate.load(tmp_path / "a")
    assert loaded.keys() == fitted.keys()
    for name, value in fitted.items():
        np.testing.assert_array_equal(loaded[name], value)


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121", "efficientnet-b0"])
def test_the_tap_sees_the_vector_the_head_classifies(backbone):
    net = build_model(backbone, pretrained=False).eval()
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    features = graph.features(net, images, batch_size=2)
    with torch.inference_mode():
        logits = net(torch.from_numpy(images)[:, None])
        from_features = graph.head_input(net)(torch.from_numpy(features).float()).squeeze(1)
    assert features.shape[0] == 3
    torch.testing.assert_close(from_features, logits, rtol=1e-4, atol=1e-4)


def test_energy_is_higher_for_less_confident_logits():
    assert list(np.argsort(gate.energy(np.array([5.0, 0.0, -3.0])))) == [0, 2, 1]


@pytest.mark.parametrize("kind", sorted(phantoms.SHIFTS))
def test_every_shift_makes_uint8_images_unlike_the_radiographs(kind):
    radiographs = np.stack([phantoms.phantom(0, i, 48, pneumonia=bool(i % 2)) for i in range(4)])
    made = phantoms.shifted(radiographs, kind)
    assert made.shape == radiographs.shape and made.dtype == np.uint8
    assert not np.array_equal(made, radiographs)
    np.testing.assert_array_equal(made, phantoms.shifted(radiographs, kind))  # seeded

"""The generated sample: deterministic, plausible in its statistics, and learnable."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pneumo.config import SampleConfig, SplitCounts
from pneumo.core.images import prepare_image
from pneumo.core.phantoms import AS_TRAINED, Acquisition, phantom
from pneumo.core.sources import patient_id, sample_entries

SMALL = SampleConfig(
    train=SplitCounts(normal=60, pneumonia=60),
    val=SplitCounts(normal=2, pneumonia=2),
    test=SplitCounts(normal=40, pneumonia=40),
    image_size=64,
)


def test_same_seed_same_bytes_different_seed_different_bytes():
    first = [e.read() for e in sample_entries(SMALL, seed=7)]
    again = [e.read() for e in sample_entries(SMALL, seed=7)]
    other = [e.read() for e in sample_entries(SMALL, seed=8)]
    assert first == again
    assert sum(a != b for a, b in zip(first, other, strict=True)) == len(first)


def test_kaggle_names_counts_and_patients():
    entries = list(sample_entries(SMALL, seed=1))
    assert len(entries) == 204
    train_sick = [e for e in entries if e.split == "train" and e.label == "PNEUMONIA"]
    assert len(train_sick) == 60
    assert all(e.name.startswith("person") for e in train_sick)
    patients = [patient_id(e.name) for e in entries]
    assert len(set(patients)) < len(patients), "some patients must have several images"
    assert len({e.name for e in entries}) == len(entries)


def test_pneumonia_brightens_the_lungs_on_average():
    lung_box = np.s_[40:80, 20:50]
    normal = np.mean([phantom(3, i, 128, False)[lung_box].mean() for i in range(30)])
    sick = np.mean([phantom(3, i, 128, True)[lung_box].mean() for i in range(30)])
    assert sick > normal + 3


def test_a_linear_model_separates_the_classes_well_above_chance():
    config = SMALL.model_copy(update={"train": SplitCounts(normal=150, pneumonia=150)})
    entries = list(sample_entries(config, seed=11))

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = [e for e in entries if e.split == split]
        x = np.stack([prepare_image(e.read(), 16, "pad").ravel() / 255.0 for e in chosen])
        return x, np.array([e.label == "PNEUMONIA" for e in chosen])

    x_train, y_train = features("train")
    x_test, y_test = features("test")
    model = LogisticRegression(C=10.0, max_iter=5000).fit(x_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    assert auc > 0.75, f"generated classes are not learnable: AUC {auc:.3f}"


def test_acquisition_settings_change_exposure_noise_and_field_of_view_only_when_asked():
    trained = np.stack([phantom(5, i, 96, bool(i % 2)) for i in range(8)]).astype(float)
    same = np.stack([phantom(5, i, 96, bool(i % 2), Acquisition()) for i in range(8)])
    assert Acquisition() == AS_TRAINED and np.array_equal(trained, same)

    def made(**settings) -> np.ndarray:
        acquisition = Acquisition(**settings)
        return np.stack([phantom(5, i, 96, bool(i % 2), acquisition) for i in range(8)])

    assert made(exposure=1.6).mean() < trained.mean() - 10  # more dose, darker
    # noise: the difference to a neighbouring pixel grows
    roughness = lambda images: np.abs(np.diff(images.astype(float), axis=-1)).mean()  # noqa: E731
    assert roughness(made(noise=4.0)) > 2 * roughness(trained)
    # a wider field shows more of the dark surround: the border columns get darker on average
    wide = made(field_of_view=1.4).astype(float)
    border = np.s_[:, :, :10]
    assert wide[border].mean() < trained[border].mean()

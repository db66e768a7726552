"""Synthetic chest radiographs, so the whole pipeline runs with no download.

The phantoms are drawn in a normalised frame (x, y in [-1, 1], y pointing down) from a few
anatomical shapes: a soft-tissue body, two dark lung fields, the mediastinum and heart shadow,
the spine, ribs and the diaphragm domes. Exposure, contrast, position and noise vary between
images. PNEUMONIA images add one or more radiological signs at random places and strengths:
a lobar consolidation, with patchy infiltrates, air bronchograms inside the opacity or a
pleural effusion blunting a costophrenic angle besides. The signs are plain to see (they add
0.4-0.7 of full brightness inside a lung), so that the sample's short CPU runs learn them:
three epochs at 48 px from scratch reach test AUCs above 0.95 with every backbone. The sample
shows that the pipeline learns and where its heatmaps point (each phantom knows its lesion,
:func:`phantom_with_lesion`), not how hard real radiographs are.

Pure numpy: each image is a function of (seed, index), so generation is order independent
and reproducible byte for byte once encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """Pixel-centre coordinates of an image, shifted and scaled by the patient's position."""

    x: np.ndarray
    y: np.ndarray


def _frame(size: int, rng: np.random.Generator, field_of_view: float = 1.0) -> Frame:
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32) * np.float32(field_of_view)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    scale = rng.uniform(0.9, 1.08)
    return Frame(x=(x - rng.uniform(-0.06, 0.06)) / scale, y=(y - rng.uniform(-0.06, 0.06)) / scale)


def _ellipse(f: Frame, cx: float, cy: float, rx: float, ry: float, soft: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge ``soft`` wide."""
    r = np.sqrt(((f.x - cx) / rx) ** 2 + ((f.y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def _blob(f: Frame, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return np.exp(-(((f.x - cx) / rx) ** 2 + ((f.y - cy) / ry) ** 2))


def _lungs(f: Frame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung masks (image left = patient right), cut by the diaphragm domes."""
    masks = []
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(0.34, 0.42)
        lung = _ellipse(f, cx, -0.08, rng.uniform(0.25, 0.3), rng.uniform(0.52, 0.6), 0.15)
        dome_top = rng.uniform(0.38, 0.5) + (0.06 if side > 0 else 0.0)
        dome = dome_top + 0.9 * (f.x - cx) ** 2
        masks.append(lung * np.clip((dome - f.y) / 0.04, 0.0, 1.0))
    return masks[0], masks[1]


def _ribs(f: Frame, rng: np.random.Generator) -> np.ndarray:
    ribs = np.zeros_like(f.x)
    spacing = rng.uniform(0.11, 0.13)
    for k in range(9):
        y0 = -0.62 + k * spacing
        curve = y0 + 0.28 * np.abs(f.x) ** 1.6 - 0.05 * np.abs(f.x)
        ribs += np.exp(-(((f.y - curve) / 0.018) ** 2))
    thorax = np.clip((0.5 - f.y) / 0.1, 0.0, 1.0)
    return np.clip(ribs, 0.0, 1.0) * thorax


def _branches(f: Frame, rng: np.random.Generator, cx: float, cy: float, reach: float) -> np.ndarray:
    """Thin dark branching lines (air bronchograms) radiating from (cx, cy)."""
    lines = np.zeros_like(f.x)
    for _ in range(rng.integers(2, 5)):
        x, y = cx, cy
        angle = rng.uniform(0.0, 2.0 * np.pi)
        for _ in range(rng.integers(6, 12)):
            angle += rng.normal(0.0, 0.35)
            step = reach / 8.0
            nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
            t = np.clip(((f.x - x) * (nx - x) + (f.y - y) * (ny - y)) / (step**2), 0.0, 1.0)
            distance = np.hypot(f.x - (x + t * (nx - x)), f.y - (y + t * (ny - y)))
            lines = np.maximum(lines, np.exp(-((distance / 0.012) ** 2)))
            x, y = nx, ny
    return lines


def _pneumonia_signs(
    f: Frame, rng: np.random.Generator, lungs: tuple[np.ndarray, np.ndarray], strength: float
) -> np.ndarray:
    """Extra opacity (0..1) inside the lungs: a lobar consolidation, and sometimes air
    bronchograms in it, patchy infiltrates or an effusion."""
    opacity = np.zeros_like(f.x)
    patchy, bronchograms, effusion = rng.random(3) < (0.5, 0.4, 0.25)
    side = int(rng.integers(0, 2))
    lung = lungs[side]
    cx = (-1.0 if side == 0 else 1.0) * rng.uniform(0.28, 0.45)
    cy = rng.uniform(-0.35, 0.3)
    region = _blob(f, cx, cy, rng.uniform(0.15, 0.25), rng.uniform(0.18, 0.35))
    consolidation = np.clip(region * 1.6, 0.0, 1.0) * lung
    if bronchograms:
        consolidation *= 1.0 - 0.7 * _branches(f, rng, cx, cy, 0.22)
    opacity += strength * consolidation
    if patchy:
        for _ in range(rng.integers(3, 9)):
            s = int(rng.integers(0, 2))
            px = (-1.0 if s == 0 else 1.0) * rng.uniform(0.2, 0.5)
            patch = _blob(
                f, px, rng.uniform(-0.5, 0.4), rng.uniform(0.05, 0.11), rng.uniform(0.05, 0.11)
            )
            opacity += 0.7 * strength * patch * lungs[s]
    if effusion:
        level = rng.uniform(0.25, 0.42)
        meniscus = level - 0.25 * np.abs(f.x - cx)
        opacity += strength * np.clip((f.y - meniscus) / 0.05, 0.0, 1.0) * (lung > 0.05)
    return np.clip(opacity, 0.0, 1.0)


# A pixel belongs to the lesion where the signs add more than this to its brightness (0..1):
# about 13 of 255 grey levels, a difference people see.
LESION_CONTRAST = 0.05


@dataclass(frozen=True)
class Acquisition:
    """Settings of the imaging, relative to the training sample's (1 each: the same):
    intensities raised to ``exposure`` (above 1 darker), noise times ``noise``, a field of
    view ``field_of_view`` times as wide. Other settings stand for another site."""

    exposure: float = 1.0
    noise: float = 1.0
    field_of_view: float = 1.0


AS_TRAINED = Acquisition()  # the training sample's settings


def phantom(
    seed: int, index: int, size: int, pneumonia: bool, acquisition: Acquisition = AS_TRAINED
) -> np.ndarray:
    """One radiograph as a uint8 (size, size) array; the same arguments give the same image."""
    return phantom_with_lesion(seed, index, size, pneumonia, acquisition)[0]


def phantom_with_lesion(
    seed: int,
    index: int,
    size: int,
    pneumonia: bool,
    acquisition: Acquisition = AS_TRAINED,
) -> tuple[np.ndarray, np.ndarray]:
    """The radiograph and a boolean (size, size) mask of where its signs of pneumonia lie
    (all False for NORMAL): the ground truth that a heatmap should point into."""
    rng = np.random.default_rng([seed, index, int(pneumonia)])
    f = _frame(size, rng, acquisition.field_of_view)
    body = _ellipse(f, 0.0, 0.15, rng.uniform(0.8, 0.92), 1.15, 0.08)
    right, left = _lungs(f, rng)
    lungs = np.maximum(right, left)
    heart = _ellipse(f, rng.uniform(0.05, 0.12), 0.22, rng.uniform(0.2, 0.26), 0.25, 0.3)
    spine = np.exp(-((f.x / 0.07) ** 4)) * (f.y > -0.9)

    image = 0.05 + 0.5 * body
    image -= 0.33 * lungs
    image += 0.12 * _ribs(f, rng) * body
    image += 0.2 * np.maximum(heart, 0.6 * spine) * body
    image += 0.05 * _blob(f, 0.0, -0.05, 0.15, 0.4) * lungs  # hilar vessels
    signs = np.zeros_like(image)
    if pneumonia:
        strength = rng.uniform(0.5, 0.8)
        signs = 0.85 * _pneumonia_signs(f, rng, (right, left), strength)
        image += signs

    gamma = rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.9, 1.1)
    image = np.clip(image, 0.0, 1.0) ** (gamma * acquisition.exposure) * contrast
    image += rng.uniform(-0.05, 0.05)
    image += rng.normal(0.0, rng.uniform(0.01, 0.035) * acquisition.noise, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8), signs > LESION_CONTRAST


# --- inputs that are not chest radiographs as the training images show them ----------------


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """1/f noise: the power spectrum of natural images, without their content."""
    frequencies = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    spectrum = rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
    image = np.fft.ifft2(spectrum / np.maximum(frequencies, 1.0 / size)).real
    return (image - image.min()) / (np.ptp(image) or 1.0) * 255


def _gradient(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(np.linspace(0.0, 255.0, image.shape[-1]), image.shape)


# Each turns a radiograph (uint8, square) into an input the input gate should flag.
SHIFTS = {
    "noise": lambda image, rng: rng.integers(0, 256, image.shape),
    "gradient": _gradient,
    "inverted": lambda image, rng: 255.0 - image,
    "rotated_90": lambda image, rng: np.rot90(image),
    "texture": lambda image, rng: _texture(rng, image.shape[-1]),
    "underexposed": lambda image, rng: image * 0.2,
    "overexposed": lambda image, rng: 255.0 * (image / 255.0) ** 0.2,
}


def shifted(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """(N, size, size) uint8 radiographs turned into inputs of one kind (:data:`SHIFTS`)."""
    rng = np.random.default_rng(seed)
    made = [SHIFTS[kind](np.asarray(image, dtype=np.float64), rng) for image in images]
    return np.clip(np.rint(np.stack(made)), 0, 255).astype(np.uint8)

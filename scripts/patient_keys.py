"""Evidence for how Kaggle pneumonia file names encode patients. Not a test. Usage:

    python scripts/patient_keys.py ../shared/data/chest_xray_dev.zip

``personN_bacteria_M`` and ``personN_virus_M`` could share one patient numbering or number
each category separately. The script counts, per split, the person ids that carry both
categories (under a shared numbering, each would be a patient with both a bacterial and a
viral pneumonia), whether the image numbers M run per category, and whether any
(personN, category) key or any bare personN sits in two splits. Last, it compares how alike
two training images are (Pearson r of 32x32 grayscale thumbnails) under the same key, under
one personN with the other category, and for two different person ids.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from collections import defaultdict

import numpy as np
from PIL import Image

NAME = re.compile(r"(?:^|/)(train|val|test)/PNEUMONIA/(person\d+)_(bacteria|virus)_(\d+)[^/]*$")


def _thumbnail(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(zf.read(name))) as image:
        pixels = np.asarray(image.convert("L").resize((32, 32)), np.float64).ravel()
    return (pixels - pixels.mean()) / (pixels.std() + 1e-9)


def similarity(zf: zipfile.ZipFile, files: dict[tuple[str, str], list[str]]) -> None:
    """Share of image pairs with r > 0.85: same key, same personN across categories, random."""

    def r(a: str, b: str) -> float:
        return float(_thumbnail(zf, a) @ _thumbnail(zf, b)) / 1024

    persons = sorted({person for person, _ in files})
    same = [r(*names[:2]) for names in files.values() if len(names) > 1]
    cross = [
        r(files[p, "bacteria"][0], files[p, "virus"][0])
        for p in persons
        if (p, "bacteria") in files and (p, "virus") in files
    ]
    rng = np.random.default_rng(0)
    keys = sorted(files)
    pairs = (rng.choice(len(keys), 2, replace=False) for _ in range(500))
    other = [r(files[keys[i]][0], files[keys[j]][0]) for i, j in pairs if keys[i][0] != keys[j][0]]
    for label, values in (
        ("same (personN, category)", same),
        ("same personN, other category", cross),
        ("different personN", other),
    ):
        print(f"{label}: {np.mean(np.array(values) > 0.85):.1%} of {len(values)} pairs r > 0.85")


def main(archive: str) -> None:
    zf = zipfile.ZipFile(archive)
    files: dict[tuple[str, str], list[str]] = defaultdict(list)  # train (personN, category)
    kinds: dict[tuple[str, str], set[str]] = defaultdict(set)  # (split, personN) → categories
    splits: dict[tuple[str, str], set[str]] = defaultdict(set)  # (personN, category) → splits
    images: dict[str, list[tuple[int, int]]] = defaultdict(list)  # category → (N, M)
    for name in sorted(zf.namelist()):
        match = NAME.search(name)
        if match and "__MACOSX" not in name:
            split, person, kind, image = match.groups()
            if split == "train":
                files[person, kind].append(name)
            kinds[split, person].add(kind)
            splits[person, kind].add(split)
            images[kind].append((int(person.removeprefix("person")), int(image)))
    for split in ("train", "val", "test"):
        persons = [v for (s, _), v in kinds.items() if s == split]
        both = sum(len(v) == 2 for v in persons)
        print(f"{split}: {len(persons)} person ids, {both} with both bacteria and virus images")
    for kind, pairs in sorted(images.items()):
        numbers = [m for _, m in sorted(pairs)]
        rising = sum(b > a for a, b in zip(numbers, numbers[1:], strict=False))
        print(
            f"{kind}: {len(pairs)} images, M from {min(numbers)} to {max(numbers)}, "
            f"rising with N in {rising} of {len(numbers) - 1} steps"
        )
    persons: dict[str, set[str]] = defaultdict(set)
    for (person, _), where in splits.items():
        persons[person] |= where
    print(
        f"(personN, category) keys in two splits: {sum(len(v) > 1 for v in splits.values())}; "
        f"bare personN in two splits: {sum(len(v) > 1 for v in persons.values())}"
    )
    similarity(zf, files)


if __name__ == "__main__":
    main(sys.argv[1])

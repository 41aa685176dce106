"""ImageNet-C (Hendrycks & Dietterich, 2019).

Native layout (the official tars ``noise.tar``, ``blur.tar``, ``weather.tar``, ``digital.tar``, extracted into
one folder)::

    <root>/
      <corruption>/              e.g. gaussian_noise, motion_blur, fog, jpeg_compression
        <severity>/              1 .. 5
          <wnid>/                e.g. n01440764 (the 1000 ImageNet classes; 50 validation images each)
            *.JPEG

Class index = position of the wnid in the sorted list of wnids (the ImageNet / torchvision convention), so a
torchvision ResNet-50 scores it directly. With all 1000 folders present that is the standard index; with fewer
(a partial copy) a warning is issued, because the indices then no longer match ImageNet's; pass ``wnids`` (the
full sorted list) to keep the standard indices.

Protocol (paper / official code): severity 5; per class 5 labeled target images, 10 validation, 10 test
(``target_test_per_class=None`` uses all the remaining images); splits seeded.

Transform. ImageNet-C images were made from the validation images *after* the standard evaluation
preprocessing (resize 256, centre crop 224): the files are already 224 x 224. The default transform is
therefore centre crop 224 (a no-op on the released files), ToTensor, ImageNet mean/std normalisation — what
the common ImageNet-C evaluation scripts use. Resizing the 224 files to 256 again would zoom in by 8 %;
``resize=256`` does it anyway (the full standard ImageNet eval transform) for copies that were stored larger.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .cifar10c import ALL_CORRUPTIONS
from .common import (
    BenchmarkData,
    DatasetLayoutError,
    ImageFileDataset,
    imagenet_eval_transform,
    sorted_files,
    split_or_layout_error,
)

__all__ = ["load_imagenet_c", "imagenet_c_transform", "IMAGENET_C_URL", "IMAGENET_C_LAYOUT", "IMAGE_SUFFIXES"]

IMAGENET_C_URL = "https://zenodo.org/record/2235448 (ImageNet-C: noise.tar, blur.tar, weather.tar, digital.tar)"
IMAGENET_C_LAYOUT = """\
<data-root>/
  <corruption>/            e.g. gaussian_noise/
    <severity>/            1 .. 5
      <wnid>/              n01440764/ ... (1000 ImageNet classes, sorted order = class index)
        *.JPEG
"""
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def imagenet_c_transform(resize: int | None = None, crop: int = 224):
    """Centre crop 224 (+ optional resize first), ToTensor, ImageNet normalisation."""
    if resize is not None:
        return imagenet_eval_transform(resize, crop)
    from torchvision import transforms as T

    from .common import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _err(problem: str, path: Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="ImageNet-C", layout=IMAGENET_C_LAYOUT, url=IMAGENET_C_URL, path=path)


def _severity_folder(given: str | Path, corruption: str, severity: int) -> Path:
    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown ImageNet-C corruption {corruption!r}; known: {', '.join(ALL_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be in 1..5, got {severity}")
    root = Path(given)
    if not root.is_dir():
        raise _err("no such folder", given)  # named as given
    if not (root / corruption).is_dir():
        raise _err("missing corruption directory", root / corruption)
    base = root / corruption / str(severity)
    if not base.is_dir():
        raise _err("missing severity directory", base)
    return base


def _classes(base: Path, present: list[str], wnids: Sequence[str] | None, what: str) -> list[str]:
    """The class list (index = position): the given wnids, or the folders present."""
    if wnids is None:
        if len(present) != 1000:
            warnings.warn(
                f"ImageNet-C {what}: {len(present)} class folders instead of 1000; class indices "
                "are positions among the folders present and do not match ImageNet's (pass wnids=...)",
                stacklevel=3,  # the caller of load_imagenet_c
            )
        return present
    classes = sorted(wnids)
    missing = sorted(set(present) - set(classes))
    if missing:
        raise _err(f"class folders not in the given wnid list: {missing[:5]}", base)
    return classes


def _image_files(base: Path, present: list[str], index: dict[str, int]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for w in present:
        files = sorted_files(base / w, IMAGE_SUFFIXES)
        if not files:
            raise _err("class folder without images", base / w)
        paths.extend(files)
        labels.extend([index[w]] * len(files))
    return paths, labels


def load_imagenet_c(
    root: str | Path,
    corruption: str = "gaussian_noise",
    severity: int = 5,
    *,
    seed: int = 0,
    target_train_per_class: int = 5,
    target_val_per_class: int = 10,
    target_test_per_class: int | None = 10,
    wnids: Sequence[str] | None = None,
    transform=None,
    resize: int | None = None,
) -> BenchmarkData:
    """Target splits of one ImageNet-C corruption at one severity (see the module docstring)."""
    base = _severity_folder(root, corruption, severity)
    present = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not present:
        raise _err("no class (wnid) directories", base)
    classes = _classes(base, present, wnids, f"{corruption}/{severity}")
    paths, labels = _image_files(base, present, {w: i for i, w in enumerate(classes)})
    lab = np.asarray(labels)
    tr, va, te = split_or_layout_error(
        lab, [target_train_per_class, target_val_per_class, target_test_per_class], seed,
        options=("target_train_per_class", "target_val_per_class", "target_test_per_class"),
        what=f"target split of {base}", error=_err,
    )
    tf = transform if transform is not None else imagenet_c_transform(resize)

    def make(idx: np.ndarray) -> ImageFileDataset:
        return ImageFileDataset([paths[i] for i in idx], lab[idx], tf)

    return BenchmarkData(
        name=f"imagenet_c/{corruption}/{severity}",
        num_classes=len(classes),
        target_train=make(tr),
        target_val=make(va),
        target_test=make(te),
        input_size=(3, 224, 224),
        normalized=True,
        info={"corruption": corruption, "severity": severity, "seed": seed, "num_class_folders": len(present)},
    )

"""CIFAR-10-C (Hendrycks & Dietterich, 2019).

Native layout (the official ``CIFAR-10-C.tar``)::

    <root>/                      (or <root>/CIFAR-10-C/)
      labels.npy                 (50000,) integer labels 0..9 (the CIFAR-10 test labels, repeated 5 times)
      gaussian_noise.npy         (50000, 32, 32, 3) uint8; severity s in rows (s-1)*10000 : s*10000
      shot_noise.npy ...         one file per corruption

The files are opened with ``np.load(mmap_mode="r")``: only the 10 000 rows of the chosen severity are ever
touched, lazily, item by item.

Protocol (paper): severity 5, per corruption; 100 labeled target images per class (1000), 10 per class for
validation, the rest (8900) for test; splits seeded (``default_rng(seed)``, per class). The official code's
test set is only the next 90 images per class (900); ``target_test_per_class=90`` reproduces that size.

Source data: optional. If ``cifar10_root`` is given (torchvision's python batches, see ``cifar10.py``),
``source_train``/``source_val`` are the clean CIFAR-10 train set (45 000 / 5 000, seeded) so the harness can
pre-train a source model; otherwise the source model must be loaded from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cifar10 import _err as _cifar10_err
from .cifar10 import load_cifar10_arrays
from .common import ArrayImageDataset, BenchmarkData, DatasetLayoutError, split_or_layout_error

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "ALL_CORRUPTIONS", "load_cifar10c", "CIFAR10C_URL", "CIFAR10C_LAYOUT"]

CIFAR10C_URL = "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)"
CIFAR10C_LAYOUT = """\
<data-root>/                 (or <data-root>/CIFAR-10-C/)
  labels.npy                 int (50000,)
  <corruption>.npy           uint8 (50000, 32, 32, 3): severity s = rows (s-1)*10000 : s*10000
                             e.g. gaussian_noise.npy, fog.npy, jpeg_compression.npy
"""

#: The 15 benchmark corruptions (the paper reports these), in the usual order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The 4 extra (held-out) corruptions shipped in the same archive.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS

PER_SEVERITY = 10_000


def _err(problem: str, path: Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="CIFAR-10-C", layout=CIFAR10C_LAYOUT, url=CIFAR10C_URL, path=path)


def _find_root(given: str | Path) -> Path:
    """The folder holding ``labels.npy``: ``given`` itself or its ``CIFAR-10-C/`` subfolder. Errors name the
    folder as the caller gave it."""
    root = Path(given)
    if not root.is_dir():
        raise _err("no such folder", given)
    for cand in (root, root / "CIFAR-10-C"):
        if (cand / "labels.npy").is_file():
            return cand
    raise _err(f"no labels.npy in {given} (nor in its CIFAR-10-C/ subfolder)")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _err("missing file", path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _err(f"malformed .npy file ({type(e).__name__}: {e})", path) from None


def _severity_arrays(root: Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(all images of the corruption, the labels of ``severity``'s rows, the first of those rows)."""
    labels_all = _load_npy(root / "labels.npy")
    images = _load_npy(root / f"{corruption}.npy")
    n = images.shape[0] if images.ndim else 0
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise _err(f"malformed image array: shape {images.shape} dtype {images.dtype}, expected (N, 32, 32, 3) uint8",
                   root / f"{corruption}.npy")
    if n % 5 != 0:
        raise _err(f"malformed image array: {n} rows is not 5 severities of equal size", root / f"{corruption}.npy")
    per_sev = n // 5  # 10 000 in the official release
    if labels_all.ndim != 1 or labels_all.shape[0] != n:
        raise _err(f"labels.npy has shape {labels_all.shape}, expected ({n},) to match {corruption}.npy",
                   root / "labels.npy")
    lo, hi = (severity - 1) * per_sev, severity * per_sev
    labels = np.asarray(labels_all[lo:hi], dtype=np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise _err("labels.npy has labels outside 0..9", root / "labels.npy")
    return images, labels, lo


def _clean_source(cifar10_root: str | Path, source_val_per_class: int, seed: int,
                  transform) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """Clean CIFAR-10 train batches as (source train, source validation), to pre-train a source model on."""
    xs, ys = load_cifar10_arrays(cifar10_root, train=True)
    s_val, s_train = split_or_layout_error(ys, [source_val_per_class, None], seed,
                                           options=("source_val_per_class", ""), what="source validation split",
                                           error=_cifar10_err)
    return ArrayImageDataset(xs, s_train, ys[s_train], transform), ArrayImageDataset(xs, s_val, ys[s_val], transform)


def load_cifar10c(
    root: str | Path,
    corruption: str = "gaussian_noise",
    severity: int = 5,
    *,
    seed: int = 0,
    target_train_per_class: int = 100,
    target_val_per_class: int = 10,
    target_test_per_class: int | None = None,
    cifar10_root: str | Path | None = None,
    source_val_per_class: int = 500,
    transform=None,
) -> BenchmarkData:
    """Target splits of one CIFAR-10-C corruption at one severity (see the module docstring)."""
    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown CIFAR-10-C corruption {corruption!r}; known: {', '.join(ALL_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be in 1..5, got {severity}")
    root = _find_root(root)
    images, labels, lo = _severity_arrays(root, corruption, severity)
    tr, va, te = split_or_layout_error(
        labels, [target_train_per_class, target_val_per_class, target_test_per_class], seed,
        options=("target_train_per_class", "target_val_per_class", "target_test_per_class"),
        what=f"target split of {corruption}.npy (severity {severity})", error=_err,
    )
    src_train, src_val = (None, None) if cifar10_root is None else _clean_source(
        cifar10_root, source_val_per_class, seed, transform)
    return BenchmarkData(
        name=f"cifar10c/{corruption}/{severity}",
        num_classes=10,
        source_train=src_train,
        source_val=src_val,
        target_train=ArrayImageDataset(images, lo + tr, labels[tr], transform),
        target_val=ArrayImageDataset(images, lo + va, labels[va], transform),
        target_test=ArrayImageDataset(images, lo + te, labels[te], transform),
        input_size=(3, 32, 32),
        normalized=False,
        info={"corruption": corruption, "severity": severity, "seed": seed},
    )

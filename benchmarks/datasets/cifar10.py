"""CIFAR-10 from torchvision's python batches, and CIFAR-Flip (CIFAR-10 with a label derangement).

Native layout (the official ``cifar-10-python.tar.gz``, also what ``torchvision.datasets.CIFAR10`` downloads)::

    <root>/cifar-10-batches-py/          (or <root> itself)
        data_batch_1 ... data_batch_5     pickled dicts: b"data" (10000 x 3072 uint8, channel-major R,G,B
        test_batch                         planes of 32 x 32), b"labels" (10000 ints in 0..9)

Nothing is downloaded.

CIFAR-Flip setup (not published by the paper's code; chosen here and documented in benchmarks/README.md):

* source: CIFAR-10 train batches with the original labels; 45 000 source train, 5 000 source val
  (500 per class, seeded);
* target: CIFAR-10 test images with every label ``y`` replaced by ``perm[y]``, where ``perm`` is a
  derangement of 0..9 (a permutation without fixed points) drawn with ``default_rng(flip_seed)`` by rejection
  (uniform over derangements). Hence a source model that is never wrong on the source task scores exactly 0 on
  the target. The permutation for the default ``flip_seed=0`` is recorded in ``BenchmarkData.info``;
* target splits mirror CIFAR-10-C: 100 labeled images per (new) class, 10 per class val, the rest test.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .common import ArrayImageDataset, BenchmarkData, DatasetLayoutError, split_or_layout_error

__all__ = ["load_cifar10_arrays", "derangement", "load_cifar_flip", "CIFAR10_URL", "CIFAR10_LAYOUT"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz)"
CIFAR10_LAYOUT = """\
<data-root>/
  cifar-10-batches-py/        (or the batch files directly in <data-root>)
    data_batch_1 ... data_batch_5   pickled dict: b"data" uint8 (10000, 3072), b"labels" list of 10000 ints
    test_batch                       same format
"""


def _err(problem: str, path: str | Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="CIFAR-10", layout=CIFAR10_LAYOUT, url=CIFAR10_URL, path=path)


def _batch_dir(given: str | Path) -> Path:
    """The folder holding the batches: ``given`` or its ``cifar-10-batches-py/`` subfolder. Errors name the
    folder as the caller gave it."""
    root = Path(given)
    if not root.is_dir():
        raise _err("no such folder", given)
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand
    raise _err(f"no CIFAR-10 python batches (data_batch_1..5, test_batch) in {given} (nor in its "
               "cifar-10-batches-py/ subfolder)")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise _err("missing file", path)
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise _err(f"malformed batch file ({type(e).__name__}: {e})", path) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise _err(f"malformed batch file (data shape {data.shape}, {len(labels)} labels; expected (N, 3072) and "
                   "N labels)", path)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise _err("malformed batch file (labels outside 0..9)", path)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_arrays(root: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images ``N x 32 x 32 x 3`` uint8 and labels, from the python batches under ``root``."""
    d = _batch_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_batch(d / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of ``0..n-1`` without fixed points (n >= 2), seeded, by rejection."""
    if n < 2:
        raise ValueError("a derangement needs n >= 2")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def load_cifar_flip(
    root: str | Path,
    *,
    flip_seed: int = 0,
    split_seed: int = 0,
    target_train_per_class: int = 100,
    target_val_per_class: int = 10,
    target_test_per_class: int | None = None,
    source_val_per_class: int = 500,
    transform=None,
) -> BenchmarkData:
    """CIFAR-Flip: source = CIFAR-10 train, target = CIFAR-10 test with labels mapped by a derangement."""
    xtr, ytr = load_cifar10_arrays(root, train=True)
    xte, yte = load_cifar10_arrays(root, train=False)
    perm = derangement(10, flip_seed)
    s_val, s_train = split_or_layout_error(ytr, [source_val_per_class, None], split_seed,
                                           options=("source_val_per_class", ""), what="source validation split",
                                           error=_err)
    yflip = perm[yte]
    t_train, t_val, t_test = split_or_layout_error(
        yflip, [target_train_per_class, target_val_per_class, target_test_per_class], split_seed,
        options=("target_train_per_class", "target_val_per_class", "target_test_per_class"),
        what="target split (of test_batch)", error=_err,
    )
    return BenchmarkData(
        name="cifar_flip",
        num_classes=10,
        source_train=ArrayImageDataset(xtr, s_train, ytr[s_train], transform),
        source_val=ArrayImageDataset(xtr, s_val, ytr[s_val], transform),
        target_train=ArrayImageDataset(xte, t_train, yflip[t_train], transform),
        target_val=ArrayImageDataset(xte, t_val, yflip[t_val], transform),
        target_test=ArrayImageDataset(xte, t_test, yflip[t_test], transform),
        input_size=(3, 32, 32),
        normalized=False,
        info={"permutation": perm.tolist(), "flip_seed": flip_seed, "split_seed": split_seed},
    )

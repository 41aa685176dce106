"""Shared pieces of the dataset loaders: the layout error, the split helpers and the Dataset classes.

Every loader returns a :class:`BenchmarkData`: plain ``torch.utils.data.Dataset`` objects whose items are
``(image_tensor, label)`` pairs. Datasets with group labels (Waterbirds, CelebA) expose them as a ``groups``
``LongTensor`` aligned with the dataset index (``dataset.groups[i]`` is the group of ``dataset[i]``); wrap a
dataset in :class:`WithGroups` to get ``(x, y, g)`` triples instead.

All splits are drawn with ``numpy.random.default_rng(seed)`` from a sorted, canonical ordering of the files,
so the same seed gives the same split on every run and every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetLayoutError",
    "BenchmarkData",
    "ImageFileDataset",
    "ArrayImageDataset",
    "WithGroups",
    "per_class_split",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "require_file",
    "require_dir",
    "split_or_layout_error",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetLayoutError(FileNotFoundError):
    """A dataset file is missing or malformed.

    The message names the offending path, what is wrong with it, the expected directory layout (a small tree)
    and the URL of the official release, so a user can fix the data root without reading the code.
    """

    def __init__(self, problem: str, *, dataset: str, layout: str, url: str, path: str | os.PathLike | None = None):
        self.problem = problem
        self.dataset = dataset
        self.layout = layout
        self.url = url
        self.path = None if path is None else str(path)
        where = f" ({self.path})" if self.path is not None else ""
        msg = (
            f"{dataset}: {problem}{where}.\n"
            f"Expected layout:\n{layout.rstrip()}\n"
            f"The data is published at: {url}"
        )
        super().__init__(msg)

    @property
    def summary(self) -> str:
        """The error on one line, for command lines: what is wrong, the path, where the data comes from."""
        where = f" ({self.path})" if self.path is not None else ""
        line = f"{self.dataset}: {self.problem}{where}; data: {self.url}; layout: benchmarks/README.md, 'Datasets'"
        return " ".join(line.split())

    def __reduce__(self):  # keep the exception picklable (DataLoader workers, multiprocessing)
        return (
            _rebuild_layout_error,
            (self.problem, self.dataset, self.layout, self.url, self.path),
        )


def _rebuild_layout_error(problem, dataset, layout, url, path):
    return DatasetLayoutError(problem, dataset=dataset, layout=layout, url=url, path=path)


def require_file(path: Path, *, dataset: str, layout: str, url: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError("missing file", dataset=dataset, layout=layout, url=url, path=path)
    return path


def require_dir(path: Path, *, dataset: str, layout: str, url: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError("missing directory", dataset=dataset, layout=layout, url=url, path=path)
    return path


@dataclass
class BenchmarkData:
    """One benchmark's data: where the harness pre-trains (source) and where it adapts (target).

    ``source_train``/``source_val`` are ``None`` where the source model is loaded rather than trained
    (CIFAR-10-C and ImageNet-C without a clean-data root). ``num_groups`` is set for datasets with group
    labels; their target datasets carry a ``groups`` tensor. ``info`` holds dataset-specific facts
    (the CIFAR-Flip permutation, the BREEDS superclasses and subclass split, ...), JSON-serialisable.
    """

    name: str
    num_classes: int
    target_train: Dataset
    target_val: Dataset
    target_test: Dataset
    source_train: Dataset | None = None
    source_val: Dataset | None = None
    num_groups: int | None = None
    input_size: tuple[int, int, int] = (3, 32, 32)
    normalized: bool = False  # True: inputs already mean/std-normalised (ImageNet-style); False: in [0, 1]
    info: dict[str, Any] = field(default_factory=dict)


def per_class_split(
    labels: Sequence[int] | np.ndarray,
    counts: Sequence[int | None],
    seed: int,
    *,
    strict: bool = True,
) -> list[np.ndarray]:
    """Split indices per class into consecutive parts of ``counts[k]`` items per class.

    ``None`` in ``counts`` (allowed only last) means "all remaining". Within each class the indices are
    permuted with ``default_rng(seed)``, classes are visited in sorted order, and each returned index array is
    sorted, so the result depends on the labels and the seed only. With ``strict`` a class with too few items
    raises ``ValueError``; otherwise it gets what is left.
    """
    labels = np.asarray(labels)
    if any(c is None for c in counts[:-1]):
        raise ValueError("only the last count may be None (= the rest)")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        need = sum(k for k in counts if k is not None)
        if strict and len(idx) < need:
            raise ValueError(f"class {c} has {len(idx)} items, the split needs {need} ({list(counts)})")
        start = 0
        for p, k in enumerate(counts):
            stop = len(idx) if k is None else start + k
            parts[p].append(idx[start:stop])
            start = min(stop, len(idx))
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def split_or_layout_error(
    labels: Sequence[int] | np.ndarray,
    counts: Sequence[int | None],
    seed: int,
    *,
    options: Sequence[str],
    what: str,
    error: Callable[[str], DatasetLayoutError],
    unit: str = "class",
) -> list[np.ndarray]:
    """:func:`per_class_split`, but a class with too few items is a :class:`DatasetLayoutError` naming the
    loader options (``options``, one per count) to lower on a smaller copy of the data."""
    try:
        return per_class_split(labels, counts, seed)
    except ValueError:
        need = {o: c for o, c in zip(options, counts) if c is not None}
        sizes = np.unique(np.asarray(labels), return_counts=True)[1]
        fewest = int(sizes.min()) if len(sizes) else 0
        settings = ", ".join(f"{o}={c}" for o, c in need.items())
        fix = " ".join(f"--loader-arg {o}=N" for o in need)
        raise error(
            f"too few images for the {what}: the smallest {unit} has {fewest}, the split takes {settings} "
            f"per {unit}; on a smaller copy lower them ({fix})"
        ) from None


def imagenet_eval_transform(resize: int = 256, crop: int = 224) -> Callable:
    """The standard ImageNet evaluation transform: resize 256, centre crop 224, ToTensor, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def imagenet_train_transform(crop: int = 224) -> Callable:
    """The standard ImageNet training augmentation: random resized crop, horizontal flip, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


class ImageFileDataset(Dataset):
    """Images read lazily from files with PIL (converted to RGB), with integer labels and optional groups."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        transform: Callable | None = None,
        groups: Sequence[int] | None = None,
    ):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            x = self.transform(img)
        else:
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return x, int(self.targets[i])


class ArrayImageDataset(Dataset):
    """Rows of an ``N x H x W x 3`` uint8 array (a ``np.memmap`` is fine: only indexed rows are read).

    Items are float tensors ``3 x H x W`` in [0, 1] (or ``transform(tensor)``) and integer labels.
    """

    def __init__(
        self,
        array: np.ndarray,
        indices: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        transform: Callable | None = None,
        groups: Sequence[int] | None = None,
    ):
        self.array = array
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.indices) != len(self.targets):
            raise ValueError("indices and labels differ in length")
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = np.asarray(self.array[self.indices[i]], dtype=np.uint8)
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


class WithGroups(Dataset):
    """Wrap a dataset that has a ``groups`` tensor so that items are ``(x, y, g)``."""

    def __init__(self, dataset: Dataset):
        groups = getattr(dataset, "groups", None)
        if groups is None:
            raise ValueError("dataset has no group labels")
        self.dataset = dataset
        self.groups = groups
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, int(self.groups[i])


def sorted_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files directly in ``folder`` whose suffix (case-insensitive) is in ``suffixes``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)

"""Loaders for the paper's seven benchmarks, each reading its dataset's native on-disk layout.

=============  ===================================  =============================================
name           loader                                native layout (see each module's docstring)
=============  ===================================  =============================================
cifar10c       :func:`load_cifar10c`                 ``<corruption>.npy`` + ``labels.npy``
imagenet_c     :func:`load_imagenet_c`               ``<corruption>/<severity>/<wnid>/*.JPEG``
living17       :func:`load_breeds` (``LIVING17``)    ImageNet ``train/``, ``val/`` + BREEDS hierarchy
entity30       :func:`load_breeds` (``ENTITY30``)    same
cifar_flip     :func:`load_cifar_flip`               ``cifar-10-batches-py/`` (python batches)
waterbirds     :func:`load_waterbirds`               ``metadata.csv`` + species folders
celeba         :func:`load_celeba`                   ``img_align_celeba/`` + ``list_*.txt``
=============  ===================================  =============================================

A missing or malformed file raises :class:`DatasetLayoutError` (a ``FileNotFoundError``) whose message has
the expected layout and the URL of the official release. Splits are seeded and deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .breeds import ENTITY30, LIVING17, BreedsHierarchy, BreedsSpec, BreedsSplit, load_breeds, make_breeds_split
from .cifar10 import derangement, load_cifar10_arrays, load_cifar_flip
from .cifar10c import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, load_cifar10c
from .common import (
    ArrayImageDataset,
    BenchmarkData,
    DatasetLayoutError,
    ImageFileDataset,
    WithGroups,
    imagenet_eval_transform,
    imagenet_train_transform,
    per_class_split,
)
from .imagenet_c import load_imagenet_c
from .spurious import load_celeba, load_waterbirds

__all__ = [
    "DATASETS",
    "load_dataset",
    "BenchmarkData",
    "DatasetLayoutError",
    "ArrayImageDataset",
    "ImageFileDataset",
    "WithGroups",
    "per_class_split",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "load_cifar10c",
    "load_imagenet_c",
    "BreedsSpec",
    "BreedsHierarchy",
    "BreedsSplit",
    "LIVING17",
    "ENTITY30",
    "make_breeds_split",
    "load_breeds",
    "load_cifar10_arrays",
    "derangement",
    "load_cifar_flip",
    "load_waterbirds",
    "load_celeba",
]


def _living17(root, **kw):
    return load_breeds(root, LIVING17, **kw)


def _entity30(root, **kw):
    return load_breeds(root, ENTITY30, **kw)


#: dataset name -> loader(root, **kwargs) -> BenchmarkData
DATASETS: dict[str, Callable[..., BenchmarkData]] = {
    "cifar10c": load_cifar10c,
    "imagenet_c": load_imagenet_c,
    "living17": _living17,
    "entity30": _entity30,
    "cifar_flip": load_cifar_flip,
    "waterbirds": load_waterbirds,
    "celeba": load_celeba,
}


def load_dataset(name: str, root: str | Path, **kwargs: Any) -> BenchmarkData:
    """Load benchmark ``name`` (a key of :data:`DATASETS`) from ``root``; kwargs go to its loader."""
    key = name.lower().replace("-", "_")
    key = {"imagenetc": "imagenet_c", "cifarflip": "cifar_flip", "cifar10_c": "cifar10c"}.get(key, key)
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key](root, **kwargs)

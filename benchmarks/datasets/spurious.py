"""Spurious-correlation benchmarks: Waterbirds (Sagawa et al., 2020) and CelebA (Liu et al., 2015).

Both report average and worst-group accuracy; group = 2 * y + spurious attribute (4 groups).

Waterbirds, native layout (the group-DRO release ``waterbird_complete95_forest2water2.tar.gz``; WILDS'
``waterbirds_v1.0`` has the same ``metadata.csv``)::

    <root>/                                    (or <root>/waterbird_complete95_forest2water2/,
      metadata.csv                                 or <root>/waterbirds_v1.0/)
      001.Black_footed_Albatross/*.jpg ...     paths as in the img_filename column

``metadata.csv``: a header line with (at least) ``img_id, img_filename, y, split, place, place_filename``;
``y`` 1 = waterbird, ``place`` 1 = water background, ``split`` 0 train, 1 val, 2 test.
Group = 2*y + place: 0 landbird/land, 1 landbird/water, 2 waterbird/land, 3 waterbird/water.

CelebA, native layout (the official "Align&Cropped" release; also torchvision's ``celeba/`` folder)::

    <root>/                                    (or <root>/celeba/)
      img_align_celeba/000001.jpg ...
      list_attr_celeba.txt      line 1: number of images; line 2: the 40 attribute names;
                                then "<filename> <40 values of 1 or -1>" (whitespace-separated)
      list_eval_partition.txt   "<filename> <0 train | 1 val | 2 test>"

Target: ``Blond_Hair`` (y = 1 if blond); spurious attribute ``Male`` (1 if male); group = 2*y + male.

Setup (not published by the paper's code; chosen here, documented in benchmarks/README.md):

* source = the official train split, with its spurious correlation; ``source_val_fraction`` (10 %) of it is held
  out (seeded) as source validation;
* target = the official validation split, whose groups are much more balanced: ``target_train_per_group``
  (default 50) labeled images per group are drawn (``default_rng(seed)``), ``target_val_per_group``
  (default: all the rest) for validation;
* target test = the official test split.
* transform (ResNet-50 at 224): Waterbirds resize 256 / centre crop 224; CelebA centre crop 178 / resize 224
  (the group-DRO choices); both normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BenchmarkData,
    DatasetLayoutError,
    ImageFileDataset,
    imagenet_eval_transform,
    split_or_layout_error,
)

__all__ = [
    "load_waterbirds",
    "load_celeba",
    "read_waterbirds_metadata",
    "read_celeba_attributes",
    "read_celeba_partition",
    "WATERBIRDS_URL",
    "WATERBIRDS_LAYOUT",
    "CELEBA_URL",
    "CELEBA_LAYOUT",
]

WATERBIRDS_URL = (
    "https://downloads.cs.stanford.edu/nlp/data/dro/waterbird_complete95_forest2water2.tar.gz "
    "(also via WILDS: https://wilds.stanford.edu/datasets/, dataset 'waterbirds')"
)
WATERBIRDS_LAYOUT = """\
<data-root>/waterbird_complete95_forest2water2/   (or <data-root> itself, or waterbirds_v1.0/)
  metadata.csv       header: img_id,img_filename,y,split,place,place_filename
                     y 0 landbird / 1 waterbird; split 0 train / 1 val / 2 test; place 0 land / 1 water
  <species folder>/<image>.jpg   e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg
"""
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images, Anno/, Eval/)"
CELEBA_LAYOUT = """\
<data-root>/                  (or <data-root>/celeba/)
  img_align_celeba/
    000001.jpg ...
  list_attr_celeba.txt        line 1: count; line 2: 40 attribute names; then "<file> <40 x (1|-1)>"
  list_eval_partition.txt     "<file> <0 train|1 val|2 test>"
"""
WATERBIRDS_DIRS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")


def _source_target(
    labels: np.ndarray,
    groups: np.ndarray,
    split: np.ndarray,
    *,
    seed: int,
    source_val_fraction: float,
    target_train_per_group: int,
    target_val_per_group: int | None,
    error: Callable[[str], DatasetLayoutError],
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = np.flatnonzero(split == 0)
    src = src[rng.permutation(len(src))]
    n_val = int(round(source_val_fraction * len(src)))
    pool = np.flatnonzero(split == 1)
    if len(pool) == 0:
        raise error("no images in the official validation split (split 1), where the target splits come from")
    tr, va = split_or_layout_error(
        groups[pool], [target_train_per_group, target_val_per_group], seed,
        options=("target_train_per_group", "target_val_per_group"),
        what="target split (of the official validation split)", error=error, unit="group",
    )
    idx = {
        "source_train": np.sort(src[n_val:]),
        "source_val": np.sort(src[:n_val]),
        "target_train": pool[tr],
        "target_val": pool[va],
        "target_test": np.flatnonzero(split == 2),
    }
    if len(idx["target_val"]) == 0:
        raise error(f"too few images for the target split: target_train_per_group={target_train_per_group} takes "
                    "every image of the official validation split and leaves none for target validation; on a "
                    "smaller copy lower it (--loader-arg target_train_per_group=N)")
    for name, where in (("source_train", "training split (split 0)"), ("target_test", "test split (split 2)")):
        if len(idx[name]) == 0:
            raise error(f"no images for {name}: the official {where} is empty")
    return idx


def _bundle(name, paths, y, g, idx, tf, info) -> BenchmarkData:
    def make(ix: np.ndarray) -> ImageFileDataset:
        return ImageFileDataset([paths[i] for i in ix], y[ix], tf, groups=g[ix])

    return BenchmarkData(
        name=name,
        num_classes=2,
        source_train=make(idx["source_train"]),
        source_val=make(idx["source_val"]),
        target_train=make(idx["target_train"]),
        target_val=make(idx["target_val"]),
        target_test=make(idx["target_test"]),
        num_groups=4,
        input_size=(3, 224, 224),
        normalized=True,
        info=info,
    )


# --------------------------------------------------------------------------------------------- Waterbirds
def _wb_err(problem: str, path: Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="Waterbirds", layout=WATERBIRDS_LAYOUT, url=WATERBIRDS_URL, path=path)


def _waterbirds_dir(given: str | Path) -> Path:
    """The folder holding ``metadata.csv``: ``given`` or one of the release's folder names inside it. Errors
    name the folder as the caller gave it."""
    root = Path(given)
    if not root.is_dir():
        raise _wb_err("no such folder", given)
    for d in (root, *(root / name for name in WATERBIRDS_DIRS)):
        if (d / "metadata.csv").is_file():
            return d
    raise _wb_err(f"no metadata.csv in {given} (nor in its {'/ or '.join(WATERBIRDS_DIRS)}/ subfolder)")


def read_waterbirds_metadata(path: Path) -> dict[str, np.ndarray | list[str]]:
    """Parse ``metadata.csv``: filenames, y, split and place (validated)."""
    if not path.is_file():
        raise _wb_err("missing metadata.csv", path)
    need = ("img_filename", "y", "split", "place")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
            raise _wb_err(f"malformed metadata.csv: header {reader.fieldnames}, needs columns {list(need)}", path)
        files, y, split, place = [], [], [], []
        for ln, row in enumerate(reader, 2):
            try:
                files.append(row["img_filename"].strip())
                y.append(int(float(row["y"])))
                split.append(int(float(row["split"])))
                place.append(int(float(row["place"])))
            except (TypeError, ValueError, AttributeError):
                raise _wb_err(f"malformed metadata.csv line {ln}: {row}", path) from None
    y_a, s_a, p_a = (np.asarray(v, dtype=np.int64) for v in (y, split, place))
    if not files:
        raise _wb_err("metadata.csv has no rows", path)
    if not (np.isin(y_a, (0, 1)).all() and np.isin(p_a, (0, 1)).all() and np.isin(s_a, (0, 1, 2)).all()):
        raise _wb_err("malformed metadata.csv: y and place must be 0/1 and split 0/1/2", path)
    return {"img_filename": files, "y": y_a, "split": s_a, "place": p_a}


def load_waterbirds(
    root: str | Path,
    *,
    seed: int = 0,
    target_train_per_group: int = 50,
    target_val_per_group: int | None = None,
    source_val_fraction: float = 0.1,
    transform=None,
    check_files: bool = True,
) -> BenchmarkData:
    """Waterbirds source/target splits with group labels (see the module docstring)."""
    d = _waterbirds_dir(root)
    meta = read_waterbirds_metadata(d / "metadata.csv")
    paths = [d / f for f in meta["img_filename"]]
    if check_files:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise _wb_err(f"{len(missing)} image(s) listed in metadata.csv are missing, e.g.", missing[0])
    y, place = meta["y"], meta["place"]
    g = 2 * y + place
    idx = _source_target(
        y, g, meta["split"], seed=seed, source_val_fraction=source_val_fraction,
        target_train_per_group=target_train_per_group, target_val_per_group=target_val_per_group, error=_wb_err,
    )
    tf = transform if transform is not None else imagenet_eval_transform()
    return _bundle("waterbirds", paths, y, g, idx, tf, {"seed": seed, "groups": "2*y + place"})


# --------------------------------------------------------------------------------------------- CelebA
def _ce_err(problem: str, path: Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="CelebA", layout=CELEBA_LAYOUT, url=CELEBA_URL, path=path)


def _celeba_dir(given: str | Path) -> Path:
    """The folder holding ``list_attr_celeba.txt``: ``given`` or its ``celeba/`` subfolder. Errors name the
    folder as the caller gave it."""
    root = Path(given)
    if not root.is_dir():
        raise _ce_err("no such folder", given)
    for d in (root, root / "celeba"):
        if (d / "list_attr_celeba.txt").is_file():
            return d
    raise _ce_err(f"no list_attr_celeba.txt in {given} (nor in its celeba/ subfolder)")


def read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: (attribute names, filenames, int8 matrix of ±1)."""
    if not path.is_file():
        raise _ce_err("missing list_attr_celeba.txt", path)
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise _ce_err("malformed list_attr_celeba.txt: needs a count line and a header line", path)
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise _ce_err(f"malformed list_attr_celeba.txt: first line {lines[0]!r} is not the image count", path) from None
    names = lines[1].split()
    files: list[str] = []
    rows: list[list[int]] = []
    for ln, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise _ce_err(f"malformed list_attr_celeba.txt line {ln}: {len(parts) - 1} values for {len(names)} "
                          "attributes", path)
        try:
            vals = [int(v) for v in parts[1:]]
        except ValueError:
            raise _ce_err(f"malformed list_attr_celeba.txt line {ln}: non-integer value", path) from None
        if any(v not in (1, -1, 0) for v in vals):
            raise _ce_err(f"malformed list_attr_celeba.txt line {ln}: values must be 1 or -1", path)
        files.append(parts[0])
        rows.append(vals)
    if len(files) != count:
        raise _ce_err(f"malformed list_attr_celeba.txt: header says {count} images, found {len(files)}", path)
    return names, files, np.asarray(rows, dtype=np.int8).reshape(len(files), len(names))


def read_celeba_partition(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise _ce_err("missing list_eval_partition.txt", path)
    out: dict[str, int] = {}
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise _ce_err(f"malformed list_eval_partition.txt line {ln}: {line!r} (expected '<file> <0|1|2>')", path)
        out[parts[0]] = int(parts[1])
    return out


def celeba_transform():
    from torchvision import transforms as T

    return T.Compose([T.CenterCrop(178), T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_celeba(
    root: str | Path,
    *,
    target_attr: str = "Blond_Hair",
    spurious_attr: str = "Male",
    seed: int = 0,
    target_train_per_group: int = 50,
    target_val_per_group: int | None = None,
    source_val_fraction: float = 0.1,
    transform=None,
    check_files: bool = True,
) -> BenchmarkData:
    """CelebA source/target splits with group labels 2*y + spurious (see the module docstring)."""
    root = _celeba_dir(root)
    names, files, attrs = read_celeba_attributes(root / "list_attr_celeba.txt")
    part = read_celeba_partition(root / "list_eval_partition.txt")
    for a in (target_attr, spurious_attr):
        if a not in names:
            raise _ce_err(f"attribute {a!r} not in list_attr_celeba.txt header", root / "list_attr_celeba.txt")
    missing_part = [f for f in files if f not in part]
    if missing_part:
        raise _ce_err(f"{len(missing_part)} image(s) have no partition, e.g. {missing_part[0]}",
                      root / "list_eval_partition.txt")
    img_dir = root / "img_align_celeba"
    if not img_dir.is_dir():
        raise _ce_err("missing image directory", img_dir)
    paths = [img_dir / f for f in files]
    if check_files:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise _ce_err(f"{len(missing)} image(s) listed in list_attr_celeba.txt are missing, e.g.", missing[0])
    y = (attrs[:, names.index(target_attr)] == 1).astype(np.int64)
    s = (attrs[:, names.index(spurious_attr)] == 1).astype(np.int64)
    g = 2 * y + s
    split = np.asarray([part[f] for f in files], dtype=np.int64)
    idx = _source_target(
        y, g, split, seed=seed, source_val_fraction=source_val_fraction,
        target_train_per_group=target_train_per_group, target_val_per_group=target_val_per_group, error=_ce_err,
    )
    tf = transform if transform is not None else celeba_transform()
    return _bundle(
        "celeba", paths, y, g, idx, tf,
        {"seed": seed, "target_attr": target_attr, "spurious_attr": spurious_attr,
         "groups": f"2*{target_attr} + {spurious_attr}"},
    )

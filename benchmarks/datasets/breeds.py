"""BREEDS subpopulation-shift benchmarks Living-17 and Entity-30 (Santurkar et al., 2021), built from an
ImageNet folder and the BREEDS hierarchy files, by this module's own code.

Native layout::

    <imagenet-root>/
      train/<wnid>/*.JPEG          ImageNet-1k train, one folder per class (the usual ``ImageFolder`` layout)
      val/<wnid>/*.JPEG            ImageNet-1k val, sorted into class folders (e.g. by the usual valprep script)
    <info-dir>/                    default: <imagenet-root>/breeds/ (or <imagenet-root> itself)
      class_hierarchy.txt          one edge per line: "<parent wnid> <child wnid>"
      dataset_class_info.json      JSON list of [class number, wnid, class name] for the 1000 ImageNet classes
      node_names.txt               one node per line: "<wnid>\\t<name>"

The hierarchy files are BREEDS' "modified" ImageNet hierarchy (URL below).

How a dataset is defined (same rules as the BREEDS paper's generator, implemented here independently):

1. The graph is restricted to the ImageNet classes of ``dataset_class_info.json`` and their ancestors.
2. The *level* of a node is the length of the longest path from the root ``n00001740`` (entity) to it.
3. Candidate superclasses: the nodes at ``level`` (under ``ancestor`` when given), in sorted wnid order, that
   have at least ``n_subclasses`` ImageNet classes below them; superclass label = rank in that sorted list.
   Living-17: level 5 under "living thing" n00004258, 4 subclasses each -> 17 superclasses.
   Entity-30: level 4 (BREEDS' ``make_entity30``; level 3 gives Entity-13), 8 subclasses each -> 30.
4. Subclasses: for each superclass in label order, ``n_subclasses`` of its ImageNet classes (sorted wnids) are
   drawn without replacement with ``numpy.random.RandomState(split_seed)`` (one generator for the whole
   dataset, default seed 2 as in BREEDS' "rand" split); the first half is the *source* domain, the second
   half the *target* domain. Source and target therefore share the superclasses and have disjoint subclasses.
   (Where BREEDS' generator would see a class twice through two children, this code deduplicates first.)

Images and splits:

* source train = ImageNet ``train`` images of the source subclasses; source val = ImageNet ``val`` images of the
  source subclasses; label = superclass.
* target labeled train / target val = ``target_train_per_class`` / ``target_val_per_class`` ImageNet ``train``
  images per superclass drawn from the target subclasses (``default_rng(seed)``, per superclass);
  target test = all ImageNet ``val`` images of the target subclasses.
  The paper does not publish its target sizes; defaults are 50 labeled and 10 validation images per
  superclass (850 / 170 for Living-17, 1500 / 300 for Entity-30).
* transform: the standard ImageNet evaluation transform (resize 256, centre crop 224, normalise); pass
  ``train_transform`` to augment the source training set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (
    BenchmarkData,
    DatasetLayoutError,
    ImageFileDataset,
    imagenet_eval_transform,
    sorted_files,
    split_or_layout_error,
)
from .imagenet_c import IMAGE_SUFFIXES

__all__ = [
    "BreedsSpec",
    "LIVING17",
    "ENTITY30",
    "BreedsHierarchy",
    "BreedsSplit",
    "make_breeds_split",
    "load_breeds",
    "BREEDS_URL",
    "BREEDS_LAYOUT",
    "ROOT_WNID",
]

BREEDS_URL = (
    "https://github.com/MadryLab/BREEDS-Benchmarks (hierarchy files: imagenet_class_hierarchy/modified/); "
    "ImageNet: https://image-net.org/download.php"
)
BREEDS_LAYOUT = """\
<data-root>/
  train/<wnid>/*.JPEG        ImageNet-1k train, one folder per class
  val/<wnid>/*.JPEG          ImageNet-1k val in class folders
  breeds/                    (--breeds-info-dir; default <data-root>/breeds, or <data-root> itself)
    class_hierarchy.txt      "<parent wnid> <child wnid>" per line
    dataset_class_info.json  [[class number, wnid, name], ...]
    node_names.txt           "<wnid>\\t<name>" per line
"""
ROOT_WNID = "n00001740"
HIERARCHY_FILES = ("class_hierarchy.txt", "dataset_class_info.json", "node_names.txt")


@dataclass(frozen=True)
class BreedsSpec:
    name: str
    level: int
    n_subclasses: int
    ancestor: str | None = None
    expected_superclasses: int | None = None  # checked when not None


LIVING17 = BreedsSpec("living17", level=5, n_subclasses=4, ancestor="n00004258", expected_superclasses=17)
ENTITY30 = BreedsSpec("entity30", level=4, n_subclasses=8, ancestor=None, expected_superclasses=30)


def _err(problem: str, path: Path | None = None) -> DatasetLayoutError:
    return DatasetLayoutError(problem, dataset="BREEDS", layout=BREEDS_LAYOUT, url=BREEDS_URL, path=path)


def _read_class_info(p: Path) -> tuple[dict[str, int], dict[str, str]]:
    """dataset_class_info.json: [[num, wnid, name], ...] -> (wnid -> number, wnid -> name)."""
    try:
        info = json.loads(p.read_text())
        leaf_num = {str(c[1]): int(c[0]) for c in info}
        leaf_name = {str(c[1]): str(c[2]) for c in info}
    except (json.JSONDecodeError, TypeError, IndexError, KeyError, ValueError) as e:
        raise _err(f"malformed dataset_class_info.json ({type(e).__name__}: {e}); expected a list of "
                   "[class number, wnid, name]", p) from None
    if not leaf_num:
        raise _err("dataset_class_info.json lists no classes", p)
    return leaf_num, leaf_name


def _read_edges(p: Path) -> list[tuple[str, str]]:
    """class_hierarchy.txt: "parent child" per line."""
    edges: list[tuple[str, str]] = []
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise _err(f"malformed class_hierarchy.txt line {ln}: {line!r} (expected '<parent> <child>')", p)
        edges.append((parts[0], parts[1]))
    return edges


def _read_node_names(p: Path) -> dict[str, str]:
    """node_names.txt: "wnid\tname" per line."""
    names: dict[str, str] = {}
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t", 1)
        if len(parts) != 2:
            raise _err(f"malformed node_names.txt line {ln}: {line!r} (expected '<wnid>\\t<name>')", p)
        names[parts[0].strip()] = parts[1].strip()
    return names


class BreedsHierarchy:
    """The BREEDS class hierarchy, parsed from its three files in their published format."""

    def __init__(self, info_dir: str | Path, root_wnid: str = ROOT_WNID):
        given, info_dir = info_dir, Path(info_dir)
        if not info_dir.is_dir():
            raise _err(f"no hierarchy folder {given} (the folder of {', '.join(HIERARCHY_FILES)})")
        for f in HIERARCHY_FILES:
            if not (info_dir / f).is_file():
                raise _err(f"missing hierarchy file {f} in the BREEDS hierarchy folder {given}")
        self.leaf_num, self.leaf_name = _read_class_info(info_dir / "dataset_class_info.json")
        self.leaves = set(self.leaf_num)
        edges = _read_edges(info_dir / "class_hierarchy.txt")
        self.node_names = _read_node_names(info_dir / "node_names.txt")
        self._build(edges, root_wnid, info_dir)

    def _build(self, edges: list[tuple[str, str]], root_wnid: str, info_dir: Path) -> None:
        # 1. restrict to the leaves and their ancestors
        parents_all: dict[str, set[str]] = {}
        for a, b in edges:
            parents_all.setdefault(b, set()).add(a)
        keep: set[str] = set()
        todo = [w for w in self.leaves if w in parents_all]
        while todo:
            w = todo.pop()
            for par in parents_all.get(w, ()):
                if par not in keep:
                    keep.add(par)
                    todo.append(par)
        nodes = keep | {w for w in self.leaves if w in parents_all}
        self.children: dict[str, list[str]] = {}
        self.parents: dict[str, list[str]] = {}
        for a, b in sorted(set(edges)):
            if a in nodes and b in nodes:
                self.children.setdefault(a, []).append(b)
                self.parents.setdefault(b, []).append(a)
        if root_wnid not in self.children:
            raise _err(f"root {root_wnid} has no descendants among the ImageNet classes", info_dir / "class_hierarchy.txt")
        self.root = root_wnid
        # 2. level = longest path from the root (nodes unreachable from the root get no level)
        self.level: dict[str, int] = {}
        order = self._topological_from_root()
        self.level[root_wnid] = 0
        for n in order:
            for c in self.children.get(n, ()):
                self.level[c] = max(self.level.get(c, 0), self.level[n] + 1)
        self._leaf_cache: dict[str, frozenset[str]] = {}

    def _topological_from_root(self) -> list[str]:
        seen: set[str] = set()
        out: list[str] = []
        stack: list[tuple[str, int]] = [(self.root, 0)]
        on_path: set[str] = set()
        while stack:
            n, i = stack.pop()
            if i == 0:
                if n in seen:
                    continue
                on_path.add(n)
            kids = self.children.get(n, [])
            if i < len(kids):
                stack.append((n, i + 1))
                c = kids[i]
                if c in on_path:
                    raise _err(f"class_hierarchy.txt has a cycle through {c}")
                if c not in seen:
                    stack.append((c, 0))
            else:
                on_path.discard(n)
                seen.add(n)
                out.append(n)
        return out[::-1]

    def name(self, wnid: str) -> str:
        return self.node_names.get(wnid, self.leaf_name.get(wnid, wnid))

    def leaves_below(self, wnid: str) -> frozenset[str]:
        """ImageNet classes at or below ``wnid`` (descent stops at an ImageNet class)."""
        if wnid in self._leaf_cache:
            return self._leaf_cache[wnid]
        out: set[str] = set()
        if wnid in self.leaves:
            out.add(wnid)
        else:
            for c in self.children.get(wnid, ()):
                out |= self.leaves_below(c)
        res = frozenset(out)
        self._leaf_cache[wnid] = res
        return res

    def descendants(self, wnid: str) -> set[str]:
        out, todo = {wnid}, [wnid]
        while todo:
            for c in self.children.get(todo.pop(), ()):
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return out

    def nodes_at_level(self, level: int, ancestor: str | None = None) -> list[str]:
        allowed = None if ancestor is None else self.descendants(ancestor)
        return sorted(n for n, lv in self.level.items() if lv == level and (allowed is None or n in allowed))


@dataclass(frozen=True)
class BreedsSplit:
    """Superclasses (label order) and, per superclass, the source and target ImageNet classes (wnids)."""

    name: str
    superclasses: list[str]
    superclass_names: list[str]
    source: list[list[str]]
    target: list[list[str]]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "superclasses": self.superclasses,
            "superclass_names": self.superclass_names,
            "source": self.source,
            "target": self.target,
        }


def make_breeds_split(
    info_dir: str | Path,
    spec: BreedsSpec,
    *,
    split_seed: int = 2,
    strict: bool = True,
) -> BreedsSplit:
    """Superclasses and the seeded disjoint source/target subclass split (rules in the module docstring)."""
    if spec.n_subclasses < 2 or spec.n_subclasses % 2:
        raise ValueError("n_subclasses must be even and >= 2")
    h = BreedsHierarchy(info_dir)
    cands = h.nodes_at_level(spec.level, spec.ancestor)
    supers = [n for n in cands if len(h.leaves_below(n)) >= spec.n_subclasses]
    if strict and spec.expected_superclasses is not None and len(supers) != spec.expected_superclasses:
        raise _err(
            f"the hierarchy gives {len(supers)} superclasses for {spec.name} (level {spec.level}, "
            f"ancestor {spec.ancestor}, >= {spec.n_subclasses} subclasses), expected {spec.expected_superclasses}; "
            "are these BREEDS' 'modified' hierarchy files?",
            Path(info_dir),
        )
    if not supers:
        raise _err(f"no superclass at level {spec.level} has {spec.n_subclasses} subclasses", Path(info_dir))
    rng = np.random.RandomState(split_seed)
    half = spec.n_subclasses // 2
    source, target = [], []
    for s in supers:
        pool = sorted(h.leaves_below(s))
        sel = [str(w) for w in rng.choice(pool, spec.n_subclasses, replace=False)]
        source.append(sel[:half])
        target.append(sel[half:])
    return BreedsSplit(spec.name, supers, [h.name(s) for s in supers], source, target)


def _default_info_dir(root: Path) -> Path:
    """``<root>/breeds`` when it exists, else ``<root>`` when it holds the hierarchy files."""
    if (root / "breeds").is_dir():
        return root / "breeds"
    if all((root / f).is_file() for f in HIERARCHY_FILES):
        return root
    raise _err(f"no hierarchy folder {root / 'breeds'} (the default: the folder of "
               f"{', '.join(HIERARCHY_FILES)}; they are not in {root} either); pass the folder with --breeds-info-dir")


def _class_files(folder: Path, wnid: str) -> list[Path]:
    d = folder / wnid
    if not d.is_dir():
        raise _err(f"missing ImageNet class folder for {wnid}", d)
    files = sorted_files(d, IMAGE_SUFFIXES)
    if not files:
        raise _err(f"ImageNet class folder {wnid} has no images", d)
    return files


def _gather(folder: Path, groups: list[list[str]]) -> tuple[list[Path], np.ndarray]:
    """The image files of every wnid of ``groups``, labelled by group index."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnids in enumerate(groups):
        for w in wnids:
            files = _class_files(folder, w)
            paths.extend(files)
            labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def load_breeds(
    root: str | Path,
    spec: BreedsSpec | str = LIVING17,
    *,
    info_dir: str | Path | None = None,
    split_seed: int = 2,
    seed: int = 0,
    target_train_per_class: int = 50,
    target_val_per_class: int = 10,
    transform=None,
    train_transform=None,
    strict: bool = True,
) -> BenchmarkData:
    """Living-17 / Entity-30 (or a custom :class:`BreedsSpec`) from an ImageNet folder and the hierarchy files."""
    if isinstance(spec, str):
        spec = {"living17": LIVING17, "entity30": ENTITY30}[spec]
    given, root = root, Path(root)
    if not root.is_dir():
        raise _err("no such folder", given)
    if info_dir is None:
        info_dir = _default_info_dir(root)
    split = make_breeds_split(info_dir, spec, split_seed=split_seed, strict=strict)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise _err("missing ImageNet split folder", root / sub)
    tf = transform if transform is not None else imagenet_eval_transform()
    ttf = train_transform if train_transform is not None else tf

    s_tr_p, s_tr_y = _gather(root / "train", split.source)
    s_va_p, s_va_y = _gather(root / "val", split.source)
    t_pool_p, t_pool_y = _gather(root / "train", split.target)
    t_te_p, t_te_y = _gather(root / "val", split.target)
    t_tr, t_va = split_or_layout_error(
        t_pool_y, [target_train_per_class, target_val_per_class], seed,
        options=("target_train_per_class", "target_val_per_class"),
        what=f"target split (ImageNet train images of the target subclasses in {root / 'train'})", error=_err,
        unit="superclass",
    )
    return BenchmarkData(
        name=spec.name,
        num_classes=len(split.superclasses),
        source_train=ImageFileDataset(s_tr_p, s_tr_y, ttf),
        source_val=ImageFileDataset(s_va_p, s_va_y, tf),
        target_train=ImageFileDataset([t_pool_p[i] for i in t_tr], t_pool_y[t_tr], tf),
        target_val=ImageFileDataset([t_pool_p[i] for i in t_va], t_pool_y[t_va], tf),
        target_test=ImageFileDataset(t_te_p, t_te_y, tf),
        input_size=(3, 224, 224),
        normalized=True,
        info={"split": split.to_json(), "split_seed": split_seed, "seed": seed},
    )

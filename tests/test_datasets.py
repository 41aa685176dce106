"""Fixture tests for benchmarks.datasets: tiny files in each dataset's native layout, written into tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
PIL = pytest.importorskip("PIL.Image")

from benchmarks.datasets import (  # noqa: E402
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    LIVING17,
    BreedsSpec,
    DatasetLayoutError,
    WithGroups,
    derangement,
    load_breeds,
    load_celeba,
    load_cifar10c,
    load_cifar_flip,
    load_dataset,
    load_imagenet_c,
    load_waterbirds,
    make_breeds_split,
    per_class_split,
)


def _jpeg(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.fromarray(arr).save(path, format="JPEG")


def _layout_error(excinfo, *fragments: str) -> None:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, FileNotFoundError)
    assert "Expected layout" in msg and "http" in msg
    for f in fragments:
        assert f in msg, (f, msg)


# ------------------------------------------------------------------------------------------------ helpers
def test_per_class_split_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), 20)
    a = per_class_split(labels, [3, 2, None], seed=1)
    b = per_class_split(labels, [3, 2, None], seed=1)
    c = per_class_split(labels, [3, 2, None], seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert [len(p) for p in a] == [12, 8, 60]
    assert len(np.unique(np.concatenate(a))) == 80
    for p, k in zip(a, (3, 2, 15)):
        assert np.bincount(labels[p]).tolist() == [k] * 4
    with pytest.raises(ValueError):
        per_class_split(labels, [30], seed=0)


# ------------------------------------------------------------------------------------------------ CIFAR-10-C
PER_CLASS_C = 15  # images per class per severity in the fixture (the real files have 1000)


def _write_cifar10c(root: Path, corruptions=("fog", "gaussian_noise")) -> None:
    root.mkdir(parents=True, exist_ok=True)
    per_sev = 10 * PER_CLASS_C
    labels_one = np.random.default_rng(0).permutation(np.repeat(np.arange(10), PER_CLASS_C)).astype(np.int64)
    np.save(root / "labels.npy", np.tile(labels_one, 5))
    for ci, c in enumerate(corruptions):
        imgs = np.zeros((5 * per_sev, 32, 32, 3), dtype=np.uint8)
        for s in range(5):  # encode severity and row in the pixels so the test can check the slicing
            imgs[s * per_sev:(s + 1) * per_sev, 0, 0, 0] = s + 1
            imgs[s * per_sev:(s + 1) * per_sev, 0, 0, 1] = np.arange(per_sev) % 256
            imgs[s * per_sev:(s + 1) * per_sev, 0, 0, 2] = ci
        np.save(root / f"{c}.npy", imgs)


def test_cifar10c_splits_shapes_labels(tmp_path):
    _write_cifar10c(tmp_path)
    d = load_cifar10c(tmp_path, "fog", target_train_per_class=5, target_val_per_class=2)
    assert d.num_classes == 10 and d.source_train is None
    assert (len(d.target_train), len(d.target_val), len(d.target_test)) == (50, 20, 10 * (PER_CLASS_C - 7))
    assert isinstance(d.target_train.array, np.memmap)  # mmap: the full file is not read
    labels = np.load(tmp_path / "labels.npy")
    for ds in (d.target_train, d.target_val, d.target_test):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
        # severity 5 rows, and the label is the label of that row
        assert round(float(x[0, 0, 0]) * 255) == 5
        row = int(ds.indices[0])
        assert 4 * 10 * PER_CLASS_C <= row < 5 * 10 * PER_CLASS_C and y == labels[row]
        assert torch.bincount(ds.targets, minlength=10).min() > 0
    idx = [set(ds.indices.tolist()) for ds in (d.target_train, d.target_val, d.target_test)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == 10 * PER_CLASS_C
    # deterministic, seed-dependent
    d2 = load_cifar10c(tmp_path, "fog", target_train_per_class=5, target_val_per_class=2)
    np.testing.assert_array_equal(d.target_train.indices, d2.target_train.indices)
    d3 = load_cifar10c(tmp_path, "fog", target_train_per_class=5, target_val_per_class=2, seed=1)
    assert not np.array_equal(d.target_train.indices, d3.target_train.indices)
    # another severity
    d1 = load_cifar10c(tmp_path, "gaussian_noise", severity=1, target_train_per_class=5, target_val_per_class=2)
    assert round(float(d1.target_test[0][0][0, 0, 0]) * 255) == 1
    assert round(float(d1.target_test[0][0][2, 0, 0]) * 255) == 1


def test_cifar10c_corruption_lists():
    assert len(CORRUPTIONS) == 15 and len(ALL_CORRUPTIONS) == 19 and len(set(ALL_CORRUPTIONS)) == 19
    with pytest.raises(ValueError):
        load_cifar10c("/nonexistent", "not_a_corruption")


def test_cifar10c_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar10c(tmp_path, "fog")
    _layout_error(e, "labels.npy", "<corruption>.npy", "zenodo.org/record/2535967")
    _write_cifar10c(tmp_path, corruptions=("fog",))
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar10c(tmp_path, "snow")
    _layout_error(e, "snow.npy", "zenodo")
    np.save(tmp_path / "snow.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar10c(tmp_path, "snow")
    _layout_error(e, "malformed", "(N, 32, 32, 3)")
    (tmp_path / "frost.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar10c(tmp_path, "frost")
    _layout_error(e, "malformed", "frost.npy")


# ------------------------------------------------------------------------------------------------ CIFAR-10 / Flip
def _write_cifar10_batches(root: Path, per_class_train: int = 60, per_class_test: int = 14) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ytr = rng.permutation(np.repeat(np.arange(10), per_class_train))
    for i, part in enumerate(np.array_split(ytr, 5), 1):
        data = np.zeros((len(part), 3072), dtype=np.uint8)
        data[:, 0] = part  # red channel, pixel (0, 0) = label
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": part.tolist(), b"batch_label": b"x"}, f)
    yte = rng.permutation(np.repeat(np.arange(10), per_class_test))
    data = np.zeros((len(yte), 3072), dtype=np.uint8)
    data[:, 0] = yte
    data[:, 1024] = 200  # green plane: checks channel-major -> HWC conversion
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": yte.tolist()}, f)
    return d


def test_derangement_properties():
    for seed in range(50):
        p = derangement(10, seed)
        assert sorted(p.tolist()) == list(range(10))  # a permutation
        assert not np.any(p == np.arange(10))  # no fixed point
    np.testing.assert_array_equal(derangement(10, 3), derangement(10, 3))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_cifar_flip(tmp_path):
    _write_cifar10_batches(tmp_path)
    d = load_cifar_flip(tmp_path, target_train_per_class=4, target_val_per_class=2, source_val_per_class=6)
    perm = np.asarray(d.info["permutation"])
    assert sorted(perm.tolist()) == list(range(10)) and not np.any(perm == np.arange(10))
    assert (len(d.source_train), len(d.source_val)) == (540, 60)
    assert (len(d.target_train), len(d.target_val), len(d.target_test)) == (40, 20, 80)
    # source labels are the originals; target labels are perm[original], so an oracle source model scores 0
    for i in range(len(d.source_train)):
        x, y = d.source_train[i]
        assert round(float(x[0, 0, 0]) * 255) == y
    hits = 0
    for ds in (d.target_train, d.target_val, d.target_test):
        for i in range(len(ds)):
            x, y = ds[i]
            orig = round(float(x[0, 0, 0]) * 255)
            assert round(float(x[1, 0, 0]) * 255) == 200
            assert y == perm[orig]
            hits += orig == y
    assert hits == 0
    d2 = load_cifar_flip(tmp_path, target_train_per_class=4, target_val_per_class=2, source_val_per_class=6)
    assert d2.info["permutation"] == d.info["permutation"]
    np.testing.assert_array_equal(d.target_train.indices, d2.target_train.indices)


def test_cifar_batches_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar_flip(tmp_path)
    _layout_error(e, "data_batch_1", "cifar-10-batches-py", "cs.toronto.edu")
    d = _write_cifar10_batches(tmp_path)
    (d / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar_flip(tmp_path)
    _layout_error(e, "malformed", "test_batch")


def test_cifar10c_with_clean_source(tmp_path):
    _write_cifar10c(tmp_path / "c")
    _write_cifar10_batches(tmp_path / "clean")
    d = load_cifar10c(tmp_path / "c", "fog", target_train_per_class=5, target_val_per_class=2,
                      cifar10_root=tmp_path / "clean", source_val_per_class=6)
    assert (len(d.source_train), len(d.source_val)) == (540, 60)


# ------------------------------------------------------------------------------------------------ ImageNet-C
WNIDS = ["n01440764", "n01443537", "n01484850"]


def _write_imagenet_c(root: Path, per_class: int = 26) -> None:
    for ci, w in enumerate(WNIDS):
        for k in range(per_class):
            _jpeg(root / "fog" / "5" / w / f"ILSVRC2012_val_{ci:03d}{k:05d}.JPEG", seed=ci * 1000 + k)


def test_imagenet_c(tmp_path):
    _write_imagenet_c(tmp_path)
    with pytest.warns(UserWarning, match="instead of 1000"):
        d = load_imagenet_c(tmp_path, "fog")
    assert d.num_classes == 3
    assert (len(d.target_train), len(d.target_val), len(d.target_test)) == (15, 30, 30)
    for ds, k in ((d.target_train, 5), (d.target_val, 10), (d.target_test, 10)):
        assert torch.bincount(ds.targets).tolist() == [k] * 3
        for p, y in zip(ds.paths, ds.targets.tolist()):
            assert Path(p).parent.name == WNIDS[y]  # index = sorted wnid order
    x, y = d.target_test[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and float(x.min()) < 0  # normalised
    sets = [set(ds.paths) for ds in (d.target_train, d.target_val, d.target_test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # deterministic
    with pytest.warns(UserWarning):
        d2 = load_imagenet_c(tmp_path, "fog")
    assert d2.target_train.paths == d.target_train.paths
    # full wnid list given: standard indices, no warning
    full = sorted(WNIDS + ["n00000001", "n09999999"])
    d3 = load_imagenet_c(tmp_path, "fog", wnids=full)
    assert d3.num_classes == 5 and set(d3.target_train.targets.tolist()) == {1, 2, 3}


def test_imagenet_c_missing(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_imagenet_c(tmp_path, "fog")
    _layout_error(e, "<corruption>/", "<wnid>/", "zenodo.org/record/2235448")
    _write_imagenet_c(tmp_path, per_class=3)
    with pytest.raises(DatasetLayoutError) as e:
        load_imagenet_c(tmp_path, "fog", severity=3)
    _layout_error(e, "severity")
    with pytest.raises(DatasetLayoutError) as e, pytest.warns(UserWarning):
        load_imagenet_c(tmp_path, "fog")  # 3 images per class < 5 + 10 + 10
    _layout_error(e, "too few")


# ------------------------------------------------------------------------------------------------ BREEDS
def _wn(i: int) -> str:
    return f"n{i:08d}"


def _write_hierarchy(info: Path, superclasses: dict[str, int], extra_levels: int = 0, ancestor: str | None = None,
                     decoys: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Write the three BREEDS files for: root -> [chain of `extra_levels` nodes (the last may be `ancestor`)]
    -> superclass -> (an intermediate node with all but one leaf, and one leaf directly), leaves = ImageNet
    classes. `decoys` are superclasses hung off the root chain's first node, outside `ancestor`."""
    info.mkdir(parents=True, exist_ok=True)
    edges: list[tuple[str, str]] = []
    names: dict[str, str] = {"n00001740": "entity"}
    leaves: dict[str, list[str]] = {}
    counter = [100]

    def new(name: str) -> str:
        counter[0] += 1
        w = _wn(counter[0])
        names[w] = name
        return w

    chain = ["n00001740"]
    for k in range(extra_levels):
        w = ancestor if (ancestor and k == extra_levels - 1) else new(f"level{k + 1}")
        names[w] = f"level{k + 1}"
        edges.append((chain[-1], w))
        chain.append(w)

    def hang(parent: str, name: str, n_leaves: int) -> str:
        s = new(name)
        edges.append((parent, s))
        mid = new(name + " (group)")
        edges.append((s, mid))
        leaves[s] = []
        for j in range(n_leaves):
            leaf = new(f"{name} breed {j}")
            edges.append((mid if j < n_leaves - 1 else s, leaf))
            leaves[s].append(leaf)
        return s

    for name, n in superclasses.items():
        hang(chain[-1], name, n)
    if decoys:
        decoy_parent = new("decoy branch")
        edges.append((chain[1] if len(chain) > 1 else chain[0], decoy_parent))
        # put the decoys at the same level as the real superclasses
        p = decoy_parent
        for k in range(len(chain) - 3):
            q = new(f"decoy level {k}")
            edges.append((p, q))
            p = q
        for name, n in decoys.items():
            hang(p, name, n)
    # a WordNet node above the leaves that is not an ancestor of any ImageNet class: must be ignored
    edges.append(("n00001740", new("unrelated")))
    all_leaves = [w for ls in leaves.values() for w in ls]
    info.joinpath("class_hierarchy.txt").write_text("".join(f"{a} {b}\n" for a, b in edges))
    info.joinpath("node_names.txt").write_text("".join(f"{w}\t{n}\n" for w, n in names.items()))
    info.joinpath("dataset_class_info.json").write_text(
        json.dumps([[i, w, names[w]] for i, w in enumerate(sorted(all_leaves))])
    )
    return leaves


def test_breeds_living17_definition_on_fixture_hierarchy(tmp_path):
    # Living-17: level 5 under n00004258; 17 superclasses with >= 4 subclasses; one with 3 is excluded;
    # decoys at level 5 outside "living thing" are excluded.
    supers = {f"living super {i}": (5 + i % 3) for i in range(17)}
    supers["too small"] = 3
    leaves = _write_hierarchy(tmp_path, supers, extra_levels=4, ancestor="n00004258",
                              decoys={"nonliving a": 6, "nonliving b": 4})
    split = make_breeds_split(tmp_path, LIVING17)
    assert len(split.superclasses) == 17 == len(split.source) == len(split.target)
    assert split.superclasses == sorted(split.superclasses)
    assert "too small" not in split.superclass_names
    assert not any(n.startswith("nonliving") for n in split.superclass_names)
    seen = set()
    for s, src, tgt in zip(split.superclasses, split.source, split.target):
        assert len(src) == 2 and len(tgt) == 2
        assert not set(src) & set(tgt)  # disjoint subclasses within the superclass
        assert set(src) | set(tgt) <= set(leaves[s])  # of the same superclass
        assert not (set(src) | set(tgt)) & seen
        seen |= set(src) | set(tgt)
    again = make_breeds_split(tmp_path, LIVING17)
    assert again == split  # same split every run
    other = make_breeds_split(tmp_path, LIVING17, split_seed=5)
    assert other.superclasses == split.superclasses and (other.source, other.target) != (split.source, split.target)
    # wrong number of superclasses -> clear error
    with pytest.raises(DatasetLayoutError) as e:
        make_breeds_split(tmp_path, BreedsSpec("living17", 5, 4, "n00004258", expected_superclasses=18))
    _layout_error(e, "17 superclasses", "class_hierarchy.txt", "BREEDS-Benchmarks")


TINY = BreedsSpec("tiny", level=1, n_subclasses=4, expected_superclasses=3)


def _write_breeds_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 2):
    leaves = _write_hierarchy(root / "breeds", {"dog": 5, "cat": 4, "bird": 6, "fish": 3})
    k = 0
    for ls in leaves.values():
        for w in ls:
            for split, n in (("train", train_per_class), ("val", val_per_class)):
                for j in range(n):
                    k += 1
                    _jpeg(root / split / w / f"{w}_{j}.JPEG", seed=k)
    return leaves


def test_breeds_loader(tmp_path):
    _write_breeds_imagenet(tmp_path)
    d = load_breeds(tmp_path, TINY, target_train_per_class=3, target_val_per_class=2)
    split = d.info["split"]
    assert d.num_classes == 3 and len(split["superclasses"]) == 3
    # each superclass: 2 source + 2 target subclasses; 4 train / 2 val images each
    assert len(d.source_train) == 3 * 2 * 4 and len(d.source_val) == 3 * 2 * 2
    assert len(d.target_train) == 9 and len(d.target_val) == 6 and len(d.target_test) == 3 * 2 * 2
    wnid_of = lambda p: Path(p).parent.name  # noqa: E731
    for ds, domain, folder in ((d.source_train, "source", "train"), (d.source_val, "source", "val"),
                               (d.target_train, "target", "train"), (d.target_val, "target", "train"),
                               (d.target_test, "target", "val")):
        for p, y in zip(ds.paths, ds.targets.tolist()):
            assert wnid_of(p) in split[domain][y] and Path(p).parent.parent.name == folder
    src = {wnid_of(p) for p in d.source_train.paths}
    tgt = {wnid_of(p) for p in d.target_train.paths + d.target_test.paths}
    assert src and tgt and not src & tgt
    assert not set(d.target_train.paths) & set(d.target_val.paths)
    x, y = d.target_train[0]
    assert x.shape == (3, 224, 224)
    d2 = load_breeds(tmp_path, TINY, target_train_per_class=3, target_val_per_class=2)
    assert d2.info == d.info and d2.target_train.paths == d.target_train.paths


def test_breeds_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_breeds(tmp_path, TINY)
    _layout_error(e, "class_hierarchy.txt", "dataset_class_info.json", "node_names.txt", "train/<wnid>/",
                  "github.com/MadryLab/BREEDS-Benchmarks")
    _write_breeds_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    with pytest.raises(DatasetLayoutError) as e:
        load_breeds(tmp_path, TINY)  # 2 target subclasses x 1 image < 50 + 10
    _layout_error(e, "too few")
    (tmp_path / "breeds" / "class_hierarchy.txt").write_text("n00001740\n")
    with pytest.raises(DatasetLayoutError) as e:
        load_breeds(tmp_path, TINY)
    _layout_error(e, "malformed class_hierarchy.txt")


# ------------------------------------------------------------------------------------------------ Waterbirds
def _write_waterbirds(root: Path, per_group=(6, 7, 8, 9)) -> Path:
    d = root / "waterbird_complete95_forest2water2"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    k = 0
    for split in (0, 1, 2):
        for g, n in enumerate(per_group):
            y, place = divmod(g, 2)
            for _ in range(n):
                k += 1
                species = "001.Black_footed_Albatross" if y else "002.Laysan_Albatross"
                fn = f"{species}/img_{k:04d}.jpg"
                _jpeg(d / fn, seed=k)
                rows.append(f"{k},{fn},{y},{split},{place},/b/bamboo_forest/{k:08d}.jpg")
    (d / "metadata.csv").write_text("\n".join(rows) + "\n")
    return d


def test_waterbirds(tmp_path):
    _write_waterbirds(tmp_path)
    d = load_waterbirds(tmp_path, target_train_per_group=3)
    assert d.num_classes == 2 and d.num_groups == 4
    n = sum((6, 7, 8, 9))
    assert len(d.source_train) + len(d.source_val) == n and len(d.source_val) == round(0.1 * n)
    assert len(d.target_train) == 12 and len(d.target_val) == n - 12 and len(d.target_test) == n
    assert torch.bincount(d.target_train.groups).tolist() == [3, 3, 3, 3]
    for ds in (d.source_train, d.target_train, d.target_val, d.target_test):
        assert torch.equal(ds.groups // 2, ds.targets)  # group = 2*y + place
    x, y, g = WithGroups(d.target_test)[0]
    assert x.shape == (3, 224, 224) and g == int(d.target_test.groups[0]) and y == g // 2
    d2 = load_waterbirds(tmp_path, target_train_per_group=3)
    assert d2.target_train.paths == d.target_train.paths and d2.source_val.paths == d.source_val.paths


def test_waterbirds_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_waterbirds(tmp_path)
    _layout_error(e, "metadata.csv", "img_filename", "waterbird_complete95_forest2water2.tar.gz")
    d = _write_waterbirds(tmp_path, per_group=(1, 1, 1, 1))
    (d / "metadata.csv").write_text("img_id,filename,y\n1,a.jpg,0\n")
    with pytest.raises(DatasetLayoutError) as e:
        load_waterbirds(tmp_path)
    _layout_error(e, "malformed metadata.csv")
    d = _write_waterbirds(tmp_path / "again", per_group=(1, 1, 1, 1))
    next(d.glob("*/*.jpg")).unlink()
    with pytest.raises(DatasetLayoutError) as e:
        load_waterbirds(tmp_path / "again")
    _layout_error(e, "missing")


# ------------------------------------------------------------------------------------------------ CelebA
CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def _write_celeba(root: Path, per_group: int = 5) -> Path:
    d = root / "celeba"
    rng = np.random.default_rng(0)
    lines, part = [], []
    k = 0
    bi, mi = CELEBA_ATTRS.index("Blond_Hair"), CELEBA_ATTRS.index("Male")
    for split in (0, 1, 2):
        for g in range(4):
            blond, male = divmod(g, 2)
            for _ in range(per_group + g):
                k += 1
                fn = f"{k:06d}.jpg"
                _jpeg(d / "img_align_celeba" / fn, seed=k, size=12)
                vals = rng.choice([-1, 1], size=40)
                vals[bi], vals[mi] = (1 if blond else -1), (1 if male else -1)
                lines.append(fn + " " + " ".join(f"{v:2d}" for v in vals))
                part.append(f"{fn} {split}")
    (d / "list_attr_celeba.txt").write_text(f"{k}\n" + " ".join(CELEBA_ATTRS) + " \n" + "\n".join(lines) + "\n")
    (d / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return d


def test_celeba(tmp_path):
    _write_celeba(tmp_path)
    d = load_celeba(tmp_path, target_train_per_group=2)
    assert d.num_groups == 4 and d.num_classes == 2
    n_split = sum(5 + g for g in range(4))
    assert len(d.target_test) == n_split and len(d.target_train) == 8 and len(d.target_val) == n_split - 8
    assert len(d.source_train) + len(d.source_val) == n_split
    assert torch.bincount(d.target_test.groups).tolist() == [5, 6, 7, 8]
    for ds in (d.source_train, d.target_train, d.target_test):
        assert torch.equal(ds.groups // 2, ds.targets)
    x, y = d.target_test[0]
    assert x.shape == (3, 224, 224)
    assert load_dataset("celeba", tmp_path, target_train_per_group=2).target_train.paths == d.target_train.paths


def test_celeba_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        load_celeba(tmp_path)
    _layout_error(e, "list_attr_celeba.txt", "img_align_celeba/", "list_eval_partition.txt", "mmlab.ie.cuhk.edu.hk")
    d = _write_celeba(tmp_path, per_group=1)
    text = (d / "list_attr_celeba.txt").read_text().splitlines()
    text[3] = text[3].rsplit(" ", 2)[0]  # drop a value
    (d / "list_attr_celeba.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetLayoutError) as e:
        load_celeba(tmp_path)
    _layout_error(e, "malformed list_attr_celeba.txt line 4")


# ------------------------------------------------------------------------------------------------ small copies
def test_default_split_sizes_on_a_small_copy_are_layout_errors(tmp_path):
    """The defaults are sized for the full datasets; on a smaller copy the loader says which option to lower
    (a DatasetLayoutError, like a missing file), instead of a bare ValueError from the split."""
    _write_cifar10c(tmp_path / "c")  # 15 images per class; the default split takes 100 + 10
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar10c(tmp_path / "c", "fog")
    assert "target_train_per_class=100" in e.value.summary and "has 15" in e.value.summary
    _write_cifar10_batches(tmp_path / "cifar")  # 60 training images per class; the default holds out 500
    with pytest.raises(DatasetLayoutError) as e:
        load_cifar_flip(tmp_path / "cifar", target_train_per_class=4)
    assert "source_val_per_class=500" in e.value.summary and "has 60" in e.value.summary
    _write_waterbirds(tmp_path / "wb", per_group=(2, 3, 4, 5))  # the default takes 50 per group
    with pytest.raises(DatasetLayoutError) as e:
        load_waterbirds(tmp_path / "wb")
    assert "target_train_per_group=50" in e.value.summary and "has 2" in e.value.summary
    _write_waterbirds(tmp_path / "wb2", per_group=(2, 2, 2, 2))
    with pytest.raises(DatasetLayoutError) as e:  # every validation image taken for training: none left
        load_waterbirds(tmp_path / "wb2", target_train_per_group=2)
    assert "leaves none for target validation" in e.value.summary and "--loader-arg" in e.value.summary


def test_missing_folders_are_named_as_given(tmp_path):
    """The error names the folder the caller passed, not a subfolder the loader would also have looked in."""
    given = str(tmp_path / "birds") + "/"
    (tmp_path / "birds").mkdir()
    with pytest.raises(DatasetLayoutError) as e:
        load_waterbirds(given)
    assert f"no metadata.csv in {given} " in e.value.summary
    assert "waterbird_complete95_forest2water2/metadata.csv" not in e.value.summary
    with pytest.raises(DatasetLayoutError) as e:
        load_breeds(tmp_path / "birds", TINY)  # neither <root>/breeds nor the files in <root>
    assert str(tmp_path / "birds" / "breeds") in e.value.summary and "--breeds-info-dir" in e.value.summary
    with pytest.raises(DatasetLayoutError) as e:
        load_breeds(tmp_path / "birds", TINY, info_dir="relative/hierarchy/")
    assert "relative/hierarchy/ " in e.value.summary
    for loader in (load_cifar10c, load_cifar_flip, load_imagenet_c, load_celeba):
        with pytest.raises(DatasetLayoutError) as e:
            loader(tmp_path / "nowhere")
        assert f"no such folder ({tmp_path / 'nowhere'})" in e.value.summary, loader

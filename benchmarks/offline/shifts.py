"""The offline distribution shifts, each genuinely of its type, and the block-noise perturbation.

* input-level: a corruption of the source distribution (pixels change; labels, classes, styles and the
  cue's pairing do not);
* feature-level: ``unseen_styles``: the same ten classes drawn only in the two styles the source never saw
  (striped, pair) - which subclasses appear changes, nothing else;
* output-level: ``label_permutation`` (y -> 9 - y, CIFAR-Flip-like: images drawn exactly as in the source)
  and ``spurious_flip`` (Waterbirds-like: the cue glyph follows ``(y + 1) % 10`` in 90 % of the target
  instead of ``y``; group 1 = the 10 % that keep the source pairing; worst-group accuracy is over these
  two groups).

Target splits per seed: ``train`` (labeled, ``per_class`` images per class), ``val`` (10 per class),
``test`` (100 per class); each split is drawn with its own generator seed, disjoint from the
pre-training seeds, and the same for every shift: all targets are built from the same clean draws
(the spurious target differs only where its cue pairing needs other random numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..protocol import evaluate
from . import data

__all__ = ["Shift", "SHIFTS", "BLOCK_NOISE_BLOCKS", "target_splits", "perturb_block"]


@dataclass(frozen=True)
class Shift:
    name: str
    kind: str  # "input" | "feature" | "output"
    description: str
    corruption: str | None = None
    styles: tuple[int, ...] = data.SOURCE_STYLES
    cue_map: str = "identity"
    permute_labels: bool = False
    #: block-noise experiment: perturb this block of the source model (target = source distribution)
    noise_block: str | None = None
    noise_scale: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SHIFTS: tuple[Shift, ...] = (
    Shift("gaussian_noise", "input", "additive Gaussian noise, sigma 0.35", corruption="gaussian_noise"),
    Shift("impulse_noise", "input", "salt-and-pepper noise on 20 % of the pixel values", corruption="impulse_noise"),
    Shift("blur", "input", "Gaussian blur, sigma 1.4 px", corruption="blur"),
    Shift("contrast", "input", "contrast reduced to 25 %", corruption="contrast"),
    Shift("unseen_styles", "feature", "classes drawn only in the two styles the source never saw", styles=(2, 3)),
    Shift("label_permutation", "output", "every label y replaced by 9 - y", permute_labels=True),
    Shift("spurious_flip", "output", "cue glyph paired with (y+1) mod 10 instead of y (90 %)", cue_map="shift"),
)

#: blocks perturbed one at a time in the block-noise experiment
BLOCK_NOISE_BLOCKS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
#: candidate noise scales (x each weight tensor's std), tried in order by :func:`calibrate_noise`
NOISE_LADDER: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 8.0)
#: calibration target: the smallest scale that brings source accuracy under this
NOISE_TARGET_ACC = 0.5


def noise_shifts(scales: dict[str, float]) -> tuple[Shift, ...]:
    """One block-noise "shift" per block; ``scales[block]`` from :func:`calibrate_noise`."""
    return tuple(
        Shift(
            f"noise_{b}",
            "block-noise",
            f"source model with Gaussian noise ({scales[b]:g} x each weight tensor's std) added to the weights of {b}",
            noise_block=b,
            noise_scale=float(scales[b]),
        )
        for b in BLOCK_NOISE_BLOCKS
    )


@torch.no_grad()
def calibrate_noise(
    model: torch.nn.Module,
    blocks: tuple[str, ...] = BLOCK_NOISE_BLOCKS,
    *,
    ladder: tuple[float, ...] = NOISE_LADDER,
    target_acc: float = NOISE_TARGET_ACC,
    n: int = 1000,
    absent: float = 0.2,
    cue_agree: float = 0.9,
) -> dict[str, dict[str, Any]]:
    """Per block, the smallest noise scale of ``ladder`` whose perturbed model (mean over two noise draws,
    calibration seeds 100 and 101, never used by the experiment) has source accuracy under ``target_acc``
    on ``n`` fresh source images. Equalises the damage: the same scale barely hurts layer4 (residual
    connections absorb it) and ruins layer1. Decided from source accuracy only, never from fine-tuning."""
    import copy

    d = data.sample(n, 6_543_210, cue_agree=cue_agree, absent=absent)
    out: dict[str, dict[str, Any]] = {}
    for b in blocks:
        tried = []
        chosen = ladder[-1]
        for scale in ladder:
            accs = []
            for s in (100, 101):
                m = perturb_block(copy.deepcopy(model), b, scale, s)
                accs.append(evaluate(m, (d["x"], d["y"]), batch_size=n).acc)
            acc = sum(accs) / len(accs)
            tried.append({"scale": scale, "source_acc": acc})
            if acc < target_acc:
                chosen = scale
                break
        out[b] = {"scale": chosen, "tried": tried}
    return out


def target_splits(
    shift: Shift,
    seed: int,
    *,
    per_class: int = 25,
    val_per_class: int = 10,
    test_per_class: int = 100,
    cue_agree: float = 0.9,
    absent: float = 0.2,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"train": (x, y), "val": (x, y), "test": (x, y[, group])}`` for ``shift`` and ``seed``."""
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    sizes = {"train": per_class, "val": val_per_class, "test": test_per_class}
    for i, (split, k) in enumerate(sizes.items()):
        # the same generator seeds for every shift: the corrupted, permuted and block-noise targets are
        # drawn from exactly the same clean images (paired comparisons)
        split_seed = 7_000_000 + 1000 * seed + 97 * i
        d = data.sample(
            k * data.NUM_CLASSES, split_seed, styles=shift.styles, cue_agree=cue_agree, cue_map=shift.cue_map, absent=absent
        )
        x, y = d["x"], d["y"]
        if shift.corruption is not None:
            x = data.corrupt(x, shift.corruption, split_seed)
        if shift.permute_labels:
            y = data.NUM_CLASSES - 1 - y
        if split == "test" and shift.cue_map == "shift":
            out[split] = (x, y, d["group"])
        else:
            out[split] = (x, y)
    return out


@torch.no_grad()
def perturb_block(model: torch.nn.Module, block: str, scale: float, seed: int) -> torch.nn.Module:
    """Add N(0, (scale * std(w))^2) noise to every weight tensor (dim > 1) of ``block``, in place."""
    from surgical_optim import param_groups_by_block

    gen = torch.Generator().manual_seed(9_000_000 + seed)
    groups = {g["name"]: g["params"] for g in param_groups_by_block(model, trainable_only=False)}
    if block not in groups:
        raise KeyError(f"no block {block!r}; blocks: {list(groups)}")
    for p in groups[block]:
        if p.dim() > 1:
            p.add_(torch.randn(p.shape, generator=gen) * (scale * p.std()))
    return model

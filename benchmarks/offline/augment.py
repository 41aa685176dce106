"""MEMO's augmented copies of 32x32 images: random colour symmetries of the generator, from a seed.

MEMO (Zhang et al. 2022) adapts on the entropy of the class distribution averaged over augmented copies
of each input. An augmentation must keep the label and stay where the source model is accurate,
or the average mixes in the model's own errors on the augmentation. The source model of this benchmark
is accurate on exact symmetries of its data generator (``data.py``), measured on 2000 clean source
images for each of the three offline source models (accuracy 94.8-96.1 % unaugmented):

* a permutation of the RGB channels: background and foreground colours are drawn independently per
  channel, so every permutation leaves the distribution unchanged (within 0.3 points);
* an inversion ``1 - x``: the generator draws dark shapes on bright backgrounds for 30 % of the images
  with the colour ranges swapped, so an inverted image is one it draws too (1.3-2.3 points lower).

Each copy takes a uniformly drawn permutation and is inverted with probability ``invert``.
The usual crops and flips are options, off by default, because the source model is not invariant to
them: a shift of one pixel costs 13-17 points (its stride-2 stem and blocks have no pooling) and three
pixels over 70; a horizontal flip costs 8-10 (the crescent and the L-shaped cue glyph are chiral).
Contrast, blur and noise augmentations are left out: they would overlap with the shifts the
stream experiment measures.

Every random number comes from the ``torch.Generator`` passed in, so the same generator state gives the
same copies; the stream experiment draws all copies of a stream once and reuses them (``stream.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment", "augmented_copies"]


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    invert: float = 0.5,
    max_shift: int = 0,
    flip: float = 0.0,
) -> torch.Tensor:
    """One augmented copy of ``images`` (N, C, H, W) in [0, 1], each image with its own random draws:
    channels permuted, inverted with probability ``invert``, shifted by up to ``max_shift`` pixels per
    axis (border replicated), mirrored with probability ``flip``."""
    n, channels, height, width = images.shape
    order = torch.rand(n, channels, generator=generator).argsort(dim=1)  # a uniform permutation per image
    inverted = torch.rand(n, generator=generator) < invert
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    mirrored = torch.rand(n, generator=generator) < flip
    out = images.gather(1, order[:, :, None, None].expand_as(images))
    out = torch.where(inverted[:, None, None, None], 1.0 - out, out)
    if max_shift == 0 and flip == 0.0:
        return out
    padded = F.pad(out, (max_shift,) * 4, mode="replicate")
    rows = offsets[0, :, None] + torch.arange(height)  # N x H: the padded row each output row reads
    cols = offsets[1, :, None] + torch.arange(width)
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    moved = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return moved.permute(0, 3, 1, 2).contiguous()


def augmented_copies(images: torch.Tensor, copies: int, seed: int, **options: float) -> torch.Tensor:
    """``copies`` augmented copies of ``images`` stacked as (copies, N, C, H, W), drawn in order from
    one generator seeded with ``seed``; ``options`` go to :func:`augment`."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([augment(images, generator, **options) for _ in range(copies)])

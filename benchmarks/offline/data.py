"""Procedural 32x32 shape images, generated with torch, deterministically from a seed.

Ten classes (shapes), each drawn in four *styles* (the subclasses): ``filled``, ``outline``, ``striped``
and ``pair`` (two smaller filled copies). The source distribution uses styles 0 and 1 only, so a target
made of styles 2 and 3 is a subpopulation shift (BREEDS-like: same classes, unseen subclasses).

Each image can carry a *spurious cue*: a small second object (one of ten glyphs: a small ring, bar,
corner, ... drawn in a corner of the canvas). In the source, the glyph equals the class with probability
``cue_agree`` (else a uniformly drawn other glyph); a target can instead tie the glyph to
``(class + 1) % 10``, which flips the correlation (Waterbirds-like). The glyph is a shape, not a colour,
so the network has to learn it with its deeper layers, as the Waterbirds background is a whole scene.
A fraction ``absent`` of the images shows no main shape at all, only the cue (for those, the cue is the
only hint at the label), so that a source model does rely on the cue: with every shape visible a
network learns the shapes perfectly and ignores a 90 %-correlated glyph entirely.

Everything is vectorised: 10 000 images take well under a second on one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "NUM_CLASSES",
    "NUM_STYLES",
    "SOURCE_STYLES",
    "STYLE_NAMES",
    "CLASS_NAMES",
    "ShapeSpec",
    "render",
    "sample",
    "corrupt",
    "CORRUPTIONS",
]

SIZE = 32
NUM_CLASSES = 10
NUM_STYLES = 4
STYLE_NAMES = ("filled", "outline", "striped", "pair")
SOURCE_STYLES = (0, 1)
CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "plus",
    "diamond",
    "star",
    "x",
    "hexagon",
    "crescent",
    "tee",
)


def _box(u: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Signed distance-like function of an axis-aligned box with half sides ``a``, ``b``."""
    return torch.maximum(u.abs() - a, v.abs() - b)


def _one_shape(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if k == 0:  # circle
        return torch.sqrt(u * u + v * v) - 0.95
    if k == 1:  # square
        return _box(u, v, 0.8, 0.8)
    if k == 2:  # triangle
        return torch.maximum(-v - 0.55, 0.87 * u.abs() + 0.5 * v - 0.5)
    if k == 3:  # plus
        return torch.minimum(_box(u, v, 0.28, 1.0), _box(u, v, 1.0, 0.28))
    if k == 4:  # diamond
        return (u.abs() + v.abs()) - 1.05
    if k == 5:  # star
        r, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
        return r - (0.62 + 0.33 * torch.cos(5 * phi + math.pi / 2))
    if k == 6:  # x
        c = math.cos(math.pi / 4)
        ur, vr = c * (u - v), c * (u + v)
        return torch.minimum(_box(ur, vr, 0.25, 1.1), _box(ur, vr, 1.1, 0.25))
    if k == 7:  # hexagon
        return torch.maximum(0.87 * u.abs() + 0.5 * v.abs(), v.abs()) - 0.85
    if k == 8:  # crescent
        r = torch.sqrt(u * u + v * v)
        return torch.maximum(r - 0.95, 0.75 - torch.sqrt((u - 0.45) ** 2 + (v + 0.15) ** 2))
    if k == 9:  # tee
        return torch.minimum(_box(u, v + 0.7, 1.0, 0.25), _box(u, v + 0.05, 0.25, 0.9))
    raise ValueError(k)


def _per_kind(fn, kinds: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Evaluate ``fn(k, u, v)`` only on the images of kind ``k`` (keeps memory and time linear)."""
    out = torch.empty_like(u)
    for k in torch.unique(kinds).tolist():
        idx = (kinds == k).nonzero().squeeze(1)
        out[idx] = fn(int(k), u[idx], v[idx])
    return out


def _shape_sdf(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-image signed function (negative inside) of shape ``cls`` at local coordinates (u, v).

    ``cls`` has shape (N,), ``u``/``v`` have shape (N, H, W); the unit shape fills roughly [-1, 1]^2.
    """
    return _per_kind(_one_shape, cls, u, v)


def _glyph_sdf(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ten cue glyphs (distinct from the class shapes): rings, bars, corners, dots, ..."""
    return _per_kind(_one_glyph, kind, u, v)


def _one_glyph(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r = torch.sqrt(u * u + v * v)
    if k == 0:  # ring
        return (r - 0.7).abs() - 0.22
    if k == 1:  # horizontal bar
        return _box(u, v, 1.0, 0.28)
    if k == 2:  # vertical bar
        return _box(u, v, 0.28, 1.0)
    if k == 3:  # L corner
        return torch.minimum(_box(u + 0.35, v, 0.28, 1.0), _box(u, v + 0.72, 1.0, 0.28))
    if k == 4:  # two dots
        return torch.minimum(_box(u + 0.6, v, 0.3, 0.3), _box(u - 0.6, v, 0.3, 0.3))
    if k == 5:  # two dots, vertical
        return torch.minimum(_box(u, v - 0.6, 0.3, 0.3), _box(u, v + 0.6, 0.3, 0.3))
    if k == 6:  # equals sign
        return torch.minimum(_box(u, v - 0.6, 1.0, 0.22), _box(u, v + 0.6, 1.0, 0.22))
    if k == 7:  # pause sign
        return torch.minimum(_box(u - 0.6, v, 0.22, 1.0), _box(u + 0.6, v, 0.22, 1.0))
    if k == 8:  # hollow square
        return torch.maximum(_box(u, v, 0.95, 0.95), -_box(u, v, 0.5, 0.5))
    if k == 9:  # dot in ring
        return torch.minimum(_box(u, v, 0.3, 0.3), (r - 0.9).abs() - 0.15)
    raise ValueError(k)


def _coverage(sdf: torch.Tensor, pixel: float) -> torch.Tensor:
    """Anti-aliased inside-ness in [0, 1] from a signed function measured in shape units."""
    return torch.sigmoid(-sdf / pixel)


@dataclass(frozen=True)
class ShapeSpec:
    """What to draw for N images: class, style, cue glyph (-1: no cue), main shape hidden or not."""

    labels: torch.Tensor
    styles: torch.Tensor
    cues: torch.Tensor
    hidden: torch.Tensor | None = None


class _Canvas:
    """Pixel-centre coordinates of N images, and the random draws they share (all from one generator, in a
    fixed order: the images depend on nothing else)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.g = n, generator
        lin = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1  # pixel centres in [-1, 1]
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.xx, self.yy = xx.expand(n, SIZE, SIZE), yy.expand(n, SIZE, SIZE)

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(self.n, *shape, generator=self.g) * (hi - lo) + lo

    def local(self, cx_, cy_, scale_, angle_, mask=None):
        """Coordinates in the frame of a shape at (cx_, cy_), of size scale_, turned by angle_."""
        gx_, gy_ = (self.xx, self.yy) if mask is None else (self.xx[mask], self.yy[mask])
        dx = (gx_ - cx_.view(-1, 1, 1)) / scale_.view(-1, 1, 1)
        dy = (gy_ - cy_.view(-1, 1, 1)) / scale_.view(-1, 1, 1)
        ca, sa = torch.cos(angle_).view(-1, 1, 1), torch.sin(angle_).view(-1, 1, 1)
        return ca * dx + sa * dy, -sa * dx + ca * dy


_PIXEL = 2.0 / SIZE


def _pose(c: _Canvas) -> dict[str, torch.Tensor]:
    """The main shape's pose and the colours (drawn in this order)."""
    p = {"scale": c.uniform(0.42, 0.55), "cx": c.uniform(-0.12, 0.12), "cy": c.uniform(-0.12, 0.12),
         "angle": c.uniform(-0.25, 0.25)}
    # colours: a dark-ish background with a gentle gradient, a bright foreground far from it
    bg, fg = c.uniform(0.05, 0.45, 3), c.uniform(0.55, 1.0, 3)
    swap = torch.rand(c.n, generator=c.g) < 0.3  # sometimes dark shape on bright background
    p["bg"], p["fg"], p["swap"] = torch.where(swap[:, None], fg, bg), torch.where(swap[:, None], bg, fg), swap
    for key, lo, hi in (("grad_dir", 0, 2 * math.pi), ("grad_amp", 0.0, 0.12), ("stripe_phase", 0, 2 * math.pi),
                        ("stripe_angle", 0, math.pi)):
        p[key] = c.uniform(lo, hi)
    return p


def _shape_alpha(spec: ShapeSpec, c: _Canvas, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Coverage of the main shape in its style (no random draws)."""
    scale, angle = p["scale"], p["angle"]
    u, v = c.local(p["cx"], p["cy"], scale, angle)
    sdf = _shape_sdf(spec.labels, u, v)
    px = (_PIXEL / scale.view(-1, 1, 1)).expand(c.n, SIZE, SIZE)
    alpha = torch.empty_like(sdf)
    st = spec.styles
    m = st == 0  # filled
    alpha[m] = _coverage(sdf[m], px[m])
    m = st == 1  # outline
    alpha[m] = _coverage(sdf[m].abs() - 0.14, px[m])
    m = st == 2  # striped: the filled shape cut by stripes of random orientation
    if m.any():
        sa_, ca_ = torch.sin(p["stripe_angle"][m]).view(-1, 1, 1), torch.cos(p["stripe_angle"][m]).view(-1, 1, 1)
        w = ca_ * u[m] + sa_ * v[m]
        stripes = torch.sigmoid(torch.sin(w * 11.0 + p["stripe_phase"][m].view(-1, 1, 1)) / 0.3)
        alpha[m] = _coverage(sdf[m], px[m]) * stripes
    m = st == 3  # pair: two smaller filled copies side by side along the shape's axis
    if m.any():
        alpha[m] = _pair_alpha(spec.labels[m], c, p, m)
    if spec.hidden is not None:
        alpha = alpha * (~spec.hidden).view(-1, 1, 1)
    return alpha


def _pair_alpha(labels: torch.Tensor, c: _Canvas, p: dict[str, torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    small = p["scale"][m] * 0.55
    off = 0.45 * p["scale"][m] / 0.5
    a_, cxm, cym = p["angle"][m], p["cx"][m], p["cy"][m]
    u1, v1 = c.local(cxm - off * torch.cos(a_), cym - off * torch.sin(a_), small, a_, m)
    u2, v2 = c.local(cxm + off * torch.cos(a_), cym + off * torch.sin(a_), small, a_, m)
    pxs = _PIXEL / small.view(-1, 1, 1)
    return torch.maximum(_coverage(_shape_sdf(labels, u1, v1), pxs), _coverage(_shape_sdf(labels, u2, v2), pxs))


def _cue(spec: ShapeSpec, c: _Canvas, swap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spurious cue, a small glyph in one of the four corners: its coverage and colour."""
    has_cue = spec.cues >= 0
    corner = torch.randint(0, 4, (c.n,), generator=c.g)
    gx = torch.where(corner % 2 == 0, -0.74, 0.74) + c.uniform(-0.04, 0.04)
    gy = torch.where(corner // 2 == 0, -0.74, 0.74) + c.uniform(-0.04, 0.04)
    gscale = c.uniform(0.2, 0.24)
    gu, gv = c.local(gx, gy, gscale, torch.zeros(c.n))
    cue_alpha = torch.zeros(c.n, SIZE, SIZE)
    if has_cue.any():
        cue_alpha[has_cue] = _coverage(
            _glyph_sdf(spec.cues[has_cue], gu[has_cue], gv[has_cue]),
            _PIXEL / gscale[has_cue].view(-1, 1, 1),
        )
    cue_colour = c.uniform(0.55, 1.0, 3)
    return cue_alpha, torch.where(swap[:, None], 1.0 - cue_colour, cue_colour)


def render(spec: ShapeSpec, generator: torch.Generator) -> torch.Tensor:
    """Draw images (N, 3, 32, 32) in [0, 1] for ``spec`` with random pose, colours and background."""
    c = _Canvas(spec.labels.numel(), generator)
    p = _pose(c)
    alpha = _shape_alpha(spec, c, p)
    cue_alpha, cue_colour = _cue(spec, c, p["swap"])
    n = c.n
    gradient = p["grad_amp"].view(-1, 1, 1) * (
        torch.cos(p["grad_dir"]).view(-1, 1, 1) * c.xx + torch.sin(p["grad_dir"]).view(-1, 1, 1) * c.yy
    )
    img = p["bg"].view(n, 3, 1, 1) + gradient.unsqueeze(1)
    img = img * (1 - alpha.unsqueeze(1)) + p["fg"].view(n, 3, 1, 1) * alpha.unsqueeze(1)
    img = img * (1 - cue_alpha.unsqueeze(1)) + cue_colour.view(n, 3, 1, 1) * cue_alpha.unsqueeze(1)
    img = img + 0.02 * torch.randn(img.shape, generator=c.g)
    return img.clamp_(0.0, 1.0)


def sample(
    n: int,
    seed: int,
    *,
    styles: tuple[int, ...] = SOURCE_STYLES,
    cue_agree: float | None = 0.9,
    cue_map: str = "identity",
    absent: float = 0.0,
    balanced: bool = True,
) -> dict[str, torch.Tensor]:
    """Draw ``n`` images; returns ``{"x", "y", "style", "cue", "group"}``.

    ``cue_agree``: probability that the cue glyph equals ``map(y)`` (``cue_map`` is ``"identity"`` or
    ``"shift"``: ``(y + 1) % 10``); otherwise the glyph is ``y`` itself under ``"shift"`` (the source's
    pairing, the minority group of a flipped target) or a uniformly drawn other glyph under
    ``"identity"``. ``None``: no cue at all. ``absent``: fraction of images whose main shape is not
    drawn at all (only the cue, if any, hints at the label): this is what makes a network trained on the
    source rely on the cue, as a Waterbirds model relies on the background. ``group`` is 0 where the glyph follows the majority
    pairing, 1 elsewhere. ``balanced``: exactly ``n // 10`` images per class (``n`` must divide).
    """
    g = torch.Generator().manual_seed(int(seed))
    if balanced:
        if n % NUM_CLASSES:
            raise ValueError(f"balanced sampling needs n divisible by {NUM_CLASSES}, got {n}")
        y = torch.arange(NUM_CLASSES).repeat_interleave(n // NUM_CLASSES)
        y = y[torch.randperm(n, generator=g)]
    else:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    style_pool = torch.tensor(styles, dtype=torch.long)
    style = style_pool[torch.randint(0, len(styles), (n,), generator=g)]
    if cue_agree is None:
        cue = torch.full((n,), -1, dtype=torch.long)
        group = torch.zeros(n, dtype=torch.long)
    else:
        agree = torch.rand(n, generator=g) < cue_agree
        if cue_map == "identity":
            other = (y + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES
            cue = torch.where(agree, y, other)
        elif cue_map == "shift":
            cue = torch.where(agree, (y + 1) % NUM_CLASSES, y)
        else:
            raise ValueError(f"cue_map must be 'identity' or 'shift', got {cue_map!r}")
        group = (~agree).long()
    hidden = torch.rand(n, generator=g) < absent
    x = render(ShapeSpec(y, style, cue, hidden), g)
    return {"x": x, "y": y, "style": style, "cue": cue, "group": group, "absent": hidden}


# ---------------------------------------------------------------------- corruptions (pixels only)
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gaussian_kernel(sigma)
    pad = k.numel() // 2
    c = x.shape[1]
    kh = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    kv = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = torch.nn.functional.pad(x, (pad, pad, 0, 0), mode="reflect")
    x = torch.nn.functional.conv2d(x, kh, groups=c)
    x = torch.nn.functional.pad(x, (0, 0, pad, pad), mode="reflect")
    return torch.nn.functional.conv2d(x, kv, groups=c)


def corrupt(x: torch.Tensor, name: str, seed: int, *, level: float | None = None) -> torch.Tensor:
    """Apply corruption ``name`` to images in [0, 1]; changes pixels only (labels are untouched).
    ``level`` (noises only): the Gaussian sigma (default 0.35), or the fraction of pixel values set to 0 or
    1, half each (default 0.2)."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if level is not None and name not in ("gaussian_noise", "impulse_noise"):
        raise ValueError(f"level applies to gaussian_noise and impulse_noise, not {name!r}")
    if name == "gaussian_noise":
        out = x + (0.35 if level is None else level) * torch.randn(x.shape, generator=g)
    elif name == "impulse_noise":
        half = 0.1 if level is None else level / 2
        r = torch.rand(x.shape, generator=g)
        out = torch.where(r < half, 0.0, torch.where(r > 1 - half, 1.0, x))
    elif name == "blur":
        out = _blur(x, 1.4)
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - mean) * 0.25 + mean
    else:
        raise ValueError(f"unknown corruption {name!r}; known: {CORRUPTIONS}")
    return out.clamp(0.0, 1.0)


CORRUPTIONS = ("gaussian_noise", "impulse_noise", "blur", "contrast")

"""Judge a rendered shapes image from its pixels alone: colours, shape, position and size.

Why: prompt adherence of `sogni-shapes-64` must be scored by something that does not share
the training code's drawing or features (a bug there would otherwise grade itself). This
module only looks at pixels: the background is the border's colour, the foreground mask is
what lies far from it, and the shape is read from the mask's geometry:

* fill ratio of the mask in its bounding box: square ~1, circle ~pi/4, triangle ~1/2;
* where the mass sits: an upward triangle has 3/4 of its area in the lower half of its box.

Position is the third of the image that holds the mask's centroid; size is the bounding box's
longer side as a fraction of the image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 40, 190),
}
"""The colour words' meanings (the model card's palette), kept here so the judge stands alone."""

SMALL_MAX = 0.33
"""A mask whose box side is under this fraction of the image is "small"."""
LARGE_MIN = 0.5
"""A mask whose box side is over this fraction of the image is "large"."""

# (fill ratio, share of the mask in the lower half of its box) of the ideal shapes.
_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (np.pi / 4, 0.5),
    "triangle": (0.5, 0.75),
}
_BORDER = 4
_MIN_PIXELS = 12
_NAMES = list(PALETTE)
_REF = np.array([PALETTE[k] for k in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one image; `shape` etc. are None when there is no foreground."""

    background: str
    colour: str | None
    shape: str | None
    horizontal: str | None  # "left" | "centre" | "right"
    vertical: str | None  # "top" | "centre" | "bottom"
    size: float  # bounding-box side / image side (0 when no foreground)
    fill: float
    lower_share: float

    @property
    def size_word(self) -> str | None:
        if self.shape is None:
            return None
        if self.size < SMALL_MAX:
            return "small"
        return "large" if self.size > LARGE_MIN else "medium"


def nearest(rgb: np.ndarray) -> str:
    """Palette name nearest (Euclidean RGB) to one colour."""
    return _NAMES[int(np.argmin(((_REF - rgb.astype(np.float64)) ** 2).sum(axis=1)))]


def _third(value: float, extent: int, names: tuple[str, str, str]) -> str:
    return names[min(2, int(3 * value / extent))]


def judge(image: np.ndarray) -> Verdict:
    """Judge an HxWx3 uint8 image of one shape on a flat background."""
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    b = _BORDER
    sides = (img[:b], img[-b:], img[b:-b, :b], img[b:-b, -b:])
    ring = np.concatenate([side.reshape(-1, 3) for side in sides])
    bg = np.median(ring, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(axis=2))
    far = dist > 60.0
    empty = Verdict(nearest(bg), None, None, None, None, 0.0, 0.0, 0.0)
    if far.sum() < _MIN_PIXELS:
        return empty
    # Foreground colour: the farther half of the far pixels, i.e. the shape's core rather than
    # its soft rim (a blurry edge blends towards the background and would shift the hue).
    core = far & (dist >= np.median(dist[far]))
    fg = np.median(img[core], axis=0)
    # Mask = pixels more than halfway from the background colour to the foreground colour,
    # so soft (anti-aliased or blurry) edges are cut where a drawn edge would be.
    axis = fg - bg
    t = ((img - bg) @ axis) / max(float(axis @ axis), 1e-6)
    mask = (t > 0.5) & (dist > 30.0)
    mask = _largest_component(mask)
    if mask.sum() < _MIN_PIXELS:
        return empty
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_h, box_w = y1 - y0, x1 - x0
    area = float(mask.sum())
    fill = area / float(box_h * box_w)
    mid = (y0 + y1) / 2.0
    lower = float(mask[int(np.ceil(mid)) :, :].sum())
    if (y0 + y1) % 2:  # the middle row is split between both halves
        lower += 0.5 * float(mask[int(mid), :].sum())
    lower_share = lower / area
    colour = nearest(fg)
    shape = min(
        _PROTOTYPES,
        key=lambda k: (fill - _PROTOTYPES[k][0]) ** 2 + (lower_share - _PROTOTYPES[k][1]) ** 2,
    )
    return Verdict(
        background=nearest(bg),
        colour=colour,
        shape=shape,
        horizontal=_third(float(xs.mean()) + 0.5, w, ("left", "centre", "right")),
        vertical=_third(float(ys.mean()) + 0.5, h, ("top", "centre", "bottom")),
        size=max(box_h, box_w) / float(max(h, w)),
        fill=fill,
        lower_share=lower_share,
    )


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected region, so stray speckles do not stretch the box."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(int(y0), int(x0))], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return mask if label <= 1 else np.asarray(labels == best)

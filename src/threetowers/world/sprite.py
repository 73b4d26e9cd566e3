"""One sprite: the compositing terms every sprite source draws into, and the geometry all sources share.

A source draws each sprite once with PIL into a `Sprite`; the renderer then pastes it with plain
numpy arithmetic, which is what keeps rendering fast. Every sprite's visible extent is about
`EXTENT` of its square box, so a rotated sprite stays in its box and sizes mean the same thing
for every source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

EXTENT = 0.72  # the shape spans this fraction of its box; rotation by <= 30 deg stays inside
ANGLES = tuple(float(a) for a in np.linspace(-30.0, 30.0, 9))  # limited so a cross never becomes an x


@dataclass(frozen=True)
class Sprite:
    """Precomputed compositing terms, so pasting is `region = region * keep + edge * outline + cover * tint (+ own)`.

    Arrays are [b, b] (or channel-first [3, b, b]): the world composites channel-first, where numpy's
    inner loops run over pixels rather than over 3 channels.
    """

    keep: np.ndarray  # float32 [b, b]: 1 - coverage of sprite and outline
    edge: np.ndarray  # float32 [b, b]: outline ring (dilated alpha minus alpha)
    cover: np.ndarray  # float32 [b, b]: alpha x texture shading, multiplies the tint (zeros when untinted)
    own: np.ndarray | None = None  # float32 [3, b, b]: alpha x own colours (untinted sources)


def make_sprite(alpha: np.ndarray, shade: np.ndarray | None = None, own: np.ndarray | None = None) -> Sprite:
    """Compositing terms from coverage alpha [b, b] in [0, 1], with a 1-2 px outline ring around it.

    shade [b, b]: texture that multiplies the tint (Fashion-MNIST); own [3, b, b]: the sprite's own
    colours, premultiplied by alpha (folder images, not tinted).
    """
    box = alpha.shape[0]
    radius = max(1, round(box / 24))
    padded = np.zeros((box + 2 * radius,) * 2, np.float32)  # np.pad is slow for tiny arrays
    padded[radius:-radius, radius:-radius] = alpha
    dilated = alpha.copy()
    for dy in range(2 * radius + 1):  # square max filter: the outline keeps objects visible on any background
        for dx in range(2 * radius + 1):
            np.maximum(dilated, padded[dy : dy + box, dx : dx + box], out=dilated)
    keep, edge = (1 - dilated).astype(np.float32), (dilated - alpha).astype(np.float32)
    if own is not None:
        return Sprite(keep=keep, edge=edge, cover=np.zeros_like(keep), own=own.astype(np.float32))
    return Sprite(keep=keep, edge=edge, cover=(alpha if shade is None else alpha * shade).astype(np.float32))


def pixels(img: Image.Image, box: int, resample: Image.Resampling = Image.Resampling.BOX) -> np.ndarray:
    """A drawn sprite resized to its box, as float32 in [0, 1]."""
    return np.asarray(img.resize((box, box), resample), dtype=np.float32) / 255.0

"""Scene backgrounds: the scene classes (`SCENES`) and the vectorised numpy pattern that draws each.

A backdrop is two muted colours of similar hue mixed by a pattern, so the saturated named colours
of the objects stand out on every scene.
"""

from __future__ import annotations

import colorsys

import numpy as np

SCENES = ["plain", "striped", "dotted", "checkered", "gradient", "grid", "noisy", "wavy", "brick", "rippled", "marbled"]


def _frac(t: np.ndarray) -> np.ndarray:
    return t - np.floor(t)  # much faster than t % 1.0 in numpy


class Backdrop:
    """Scene backgrounds at one image size: a pixel grid and one pattern function per scene class.

    Each pattern returns a mixing map m [S, S] in [0, 1]; the picture is c1 + m (c2 - c1) for two
    colours of similar hue, channel-first. Axis-aligned patterns work on a row (1, S) and a column
    (S, 1) and broadcast at the end. Lengths are in units of size/48, so a pattern looks the same at
    every size.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.unit = size / 48.0
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.x, self.y = coords[None, :], coords[:, None]
        # bilinear upsampling matrix for smooth random fields (marble): field = A @ G @ A.T
        knots = 6
        pos = (np.arange(size) + 0.5) / size * (knots - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, knots - 2)
        frac = (pos - lo).astype(np.float32)
        self.upsample = np.zeros((size, knots), np.float32)
        self.upsample[np.arange(size), lo] = 1 - frac
        self.upsample[np.arange(size), lo + 1] = frac
        self._patterns = [getattr(self, "_" + name) for name in SCENES]

    def draw(self, scene: int, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
        """float32 [3, S, S] in [0, 1] (channel-first)."""
        c1, c2 = self._colours(rng)
        m = self._patterns[scene](rng)
        return c1[:, None, None] + m[None] * ((c2 - c1) * np.float32(contrast))[:, None, None]

    def _colours(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # Muted colours (low saturation), so the saturated named object colours stand out.
        hue, sat = rng.random(), 0.1 + 0.35 * rng.random()
        v1 = 0.5 + 0.4 * rng.random()
        v2 = v1 - 0.3 - 0.2 * rng.random()
        if rng.random() < 0.5:
            v1, v2 = v2, v1
        c1 = colorsys.hsv_to_rgb(hue, sat, v1)
        c2 = colorsys.hsv_to_rgb((hue + 0.1 * rng.standard_normal()) % 1.0, 0.1 + 0.35 * rng.random(), v2)
        return np.asarray(c1, np.float32), np.asarray(c2, np.float32)

    def _length(self, rng: np.random.Generator, lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) * self.unit

    def _plain(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((self.size, self.size), np.float32)

    def _striped(self, rng: np.random.Generator) -> np.ndarray:
        t = np.deg2rad(45.0 * rng.integers(4) + rng.uniform(-10, 10))
        p = self._length(rng, 5, 10)
        phase = (self.x * (np.cos(t) / p) + rng.random()) + self.y * (np.sin(t) / p)
        return (_frac(phase) < 0.5).astype(np.float32)

    def _dotted(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 7, 11)
        r = rng.uniform(0.22, 0.34)
        ox, oy = rng.random(2)
        dx = _frac(self.x / p + ox) - 0.5
        dy = _frac(self.y / p + oy) - 0.5
        return (dx * dx + dy * dy < r * r).astype(np.float32)

    def _checkered(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 5, 10)
        ox, oy = rng.random(2)
        cells = np.floor(self.x / p + ox) + np.floor(self.y / p + oy)
        return (_frac(cells * 0.5) > 0.25).astype(np.float32)  # odd cells

    def _gradient(self, rng: np.random.Generator) -> np.ndarray:
        t = rng.uniform(0, 2 * np.pi)
        half = self.size / 2
        d = (self.x - half) * (np.cos(t) / self.size) + ((self.y - half) * (np.sin(t) / self.size) + 0.5)
        return np.clip(d, 0.0, 1.0)

    def _grid(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 7, 12)
        w = max(1.0, self.unit * rng.uniform(1.0, 1.8)) / p
        ox, oy = rng.random(2)
        return ((_frac(self.x / p + ox) < w) | (_frac(self.y / p + oy) < w)).astype(np.float32)

    def _noisy(self, rng: np.random.Generator) -> np.ndarray:
        return rng.random((self.size, self.size), dtype=np.float32)

    def _wavy(self, rng: np.random.Generator) -> np.ndarray:
        amp, wavelength, p = self._length(rng, 2.0, 3.5), self._length(rng, 14, 22), self._length(rng, 6, 10)
        along, across = (self.x, self.y) if rng.random() < 0.5 else (self.y, self.x)
        wave = amp * np.sin(along * (2 * np.pi / wavelength) + rng.uniform(0, 2 * np.pi)) + rng.random() * p
        return (_frac((across + wave) / p) < 0.5).astype(np.float32)

    def _brick(self, rng: np.random.Generator) -> np.ndarray:
        h = self._length(rng, 5, 8)
        w = 2 * h
        mortar = max(1.0, self.unit)
        rows = (self.y + rng.uniform(0, h)) / h
        shift = _frac(np.floor(rows) * 0.5)  # 0 or 0.5 brick: alternate rows are offset
        joints = _frac(self.x / w + rng.random() + shift) < mortar / w
        return ((_frac(rows) < mortar / h) | joints).astype(np.float32)

    def _rippled(self, rng: np.random.Generator) -> np.ndarray:
        cx, cy = rng.uniform(-0.25, 1.25, 2) * self.size
        p = self._length(rng, 5, 9)
        d = np.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2)
        return (_frac(d / p + rng.random()) < 0.5).astype(np.float32)

    def _marbled(self, rng: np.random.Generator) -> np.ndarray:
        f = self.upsample @ rng.standard_normal((6, 6), dtype=np.float32) @ self.upsample.T
        lo, hi = f.min(), f.max()
        return (f - lo) / max(hi - lo, 1e-6)

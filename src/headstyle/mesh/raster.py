"""Triangle rasterisation on a pixel grid: which pixel centres each triangle covers, with barycentrics.

Coordinates are in pixels: x along a row (columns), y down the image (rows); pixel (row i, col j)
has its centre at (j + 0.5, i + 0.5). A centre on an edge shared by two triangles is reported for
both (the callers keep one). Numpy only: triangles are expanded to the pixel centres of their
bounding boxes in chunks of at most ``budget`` candidates, which bounds memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BUDGET = 1 << 20  # candidate pixel centres per chunk (about 200 MB of temporaries)
EDGE_TOLERANCE = 1e-9  # barycentric slack, so that centres on an edge are not lost to rounding


@dataclass
class Coverage:
    """Pixel centres inside triangles: pixel (T,) flat row-major index, face (T,), barycentric (T, 3) float64."""

    pixel: np.ndarray
    face: np.ndarray
    barycentric: np.ndarray


def _chunks(counts: np.ndarray, budget: int) -> Iterator[slice]:
    """Consecutive face ranges whose candidate counts sum to about ``budget`` (a face bigger than that alone)."""
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
        yield slice(start, stop)
        start = stop


def rasterise(triangles: np.ndarray, width: int, height: int, budget: int = BUDGET) -> Coverage:
    """The pixel centres of a ``width`` x ``height`` grid inside each triangle (F, 3, 2) (pixel coordinates)."""
    tri = np.asarray(triangles, dtype=np.float64)
    lo = np.clip(np.ceil(tri.min(axis=1) - 0.5), 0, None).astype(np.int64)
    hi = np.minimum(np.floor(tri.max(axis=1) - 0.5), [width - 1, height - 1]).astype(np.int64)
    span = np.clip(hi - lo + 1, 0, None)
    counts = span[:, 0] * span[:, 1]
    pixels, faces, weights = [], [], []
    for chunk in _chunks(counts, budget):
        n = counts[chunk]
        face = np.repeat(np.arange(chunk.start, chunk.stop), n)
        if not len(face):
            continue
        k = np.arange(len(face)) - np.repeat(np.cumsum(n) - n, n)
        x = lo[face, 0] + k % span[face, 0]
        y = lo[face, 1] + k // span[face, 0]
        bary = barycentric(tri[face], np.stack((x + 0.5, y + 0.5), axis=-1))
        inside = np.all(bary >= -EDGE_TOLERANCE, axis=1)
        pixels.append((y * width + x)[inside])
        faces.append(face[inside])
        weights.append(bary[inside])
    if not pixels:
        return Coverage(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)))
    return Coverage(np.concatenate(pixels), np.concatenate(faces), np.concatenate(weights))


def barycentric(tri: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (N, 3) of 2D ``points`` (N, 2) in triangles (N, 3, 2); degenerate ones give -1."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2, d = b - a, c - a, points - a
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    safe = np.where(area == 0, 1.0, area)
    w1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / safe
    w2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / safe
    out = np.stack((1 - w1 - w2, w1, w2), axis=-1)
    out[area == 0] = -1.0
    return out

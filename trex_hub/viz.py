"""Look, don't read: a picture of each image's nearest neighbours by cosine similarity.

:func:`nearest_neighbours` ranks the other rows of a feature matrix by cosine similarity;
:func:`neighbours_figure` draws one row per query image: the query, then its ``k`` nearest
neighbours with their scores (and, when labels are given, green / red titles for a neighbour of
the same / another label). The thumbnails are the 224 x 224 centre crops the model saw.

matplotlib is imported inside the functions (``pip install trex_hub[interop]`` or ``[eval]``) and
only through ``matplotlib.figure.Figure`` (the Agg canvas), so no pyplot state or GUI backend is
touched.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .fileio import PathLike, atomic_write


def nearest_neighbours(features: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(indices, scores)``, each ``[N, k]``: for every row, the ``k`` other rows with the
    highest cosine similarity, best first (a row is never its own neighbour)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a [N, D] feature matrix with N >= 2 rows; got shape {x.shape}")
    k = int(k)
    if not 1 <= k <= x.shape[0] - 1:
        raise ValueError(f"k={k}: with {x.shape[0]} images, pick k from 1 to {x.shape[0] - 1}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, axis=1)


def _thumbnail(image: Any, what: str) -> np.ndarray:
    from .transforms import Decoder

    return Decoder("transfer", draft=True)(image, what)


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def neighbours_figure(images: Sequence[Any], features: Any, out: PathLike, *, k: int = 4,
                      queries: Optional[Sequence[int]] = None,
                      names: Optional[Sequence[str]] = None,
                      labels: Optional[Sequence[Any]] = None,
                      title: Optional[str] = None, dpi: int = 100) -> Path:
    """Write a PNG grid: one row per query (default: every image, at most 12 spread evenly),
    the query first, then its ``k`` nearest neighbours among all the images with their cosine
    similarity. ``images[i]`` (a path, PIL image or uint8 array) belongs to ``features[i]``.
    Returns ``out``."""
    from matplotlib.figure import Figure

    feats = np.asarray(features)
    if len(images) != feats.shape[0]:
        raise ValueError(f"{len(images)} images for {feats.shape[0]} feature rows; pass one "
                         "image per row")
    n = len(images)
    k = min(k, n - 1) if n > 1 else k
    idx, scores = nearest_neighbours(feats, k)
    if queries is None:
        queries = list(range(n)) if n <= 12 else \
            sorted({int(round(i)) for i in np.linspace(0, n - 1, 12)})
    queries = [int(q) for q in queries]
    bad = [q for q in queries if not 0 <= q < n]
    if bad or not queries:
        raise ValueError(f"query rows {bad or queries} are outside 0..{n - 1}")
    names = [str(x) for x in names] if names is not None else \
        [Path(str(im)).name if isinstance(im, (str, Path)) else f"#{i}"
         for i, im in enumerate(images)]
    cache: dict = {}

    def thumb(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = _thumbnail(images[i], f"image {i} ({names[i]})")
        return cache[i]

    cols = k + 1
    fig = Figure(figsize=(2.1 * cols, 2.45 * len(queries) + (0.5 if title else 0.1)))
    axes = np.asarray(fig.subplots(len(queries), cols, squeeze=False))
    for r, q in enumerate(queries):
        cells: List[Tuple[int, str, str]] = [(q, f"query\n{_short(names[q])}", "black")]
        for rank, (j, s) in enumerate(zip(idx[q], scores[q]), 1):
            colour = "dimgray"
            if labels is not None:
                colour = "darkgreen" if labels[j] == labels[q] else "firebrick"
            cells.append((int(j), f"#{rank}  cos {s:.3f}\n{_short(names[j])}", colour))
        for c, (i, text, colour) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(thumb(i))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(text, fontsize=8.5, color=colour,
                         fontweight="bold" if c == 0 else "normal")
            for spine in ax.spines.values():
                spine.set_edgecolor("black" if c == 0 else colour)
                spine.set_linewidth(2.0 if c == 0 else 1.0)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write(buf.getvalue()))
    return out


__all__ = ["nearest_neighbours", "neighbours_figure"]

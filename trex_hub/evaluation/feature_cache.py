"""The feature cache of ``trex-eval run --cache``: features reused when weights and inputs match."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from .. import datasets as dsets
from ..model import weights_digest
from .models import display_name
from .options import DataOptions, FeatureOptions

CACHE_KEY_VERSION = 2  # 2: weights by content, images by size and modification time


def _file_stamp(item: Any) -> str:
    """``size:mtime_ns`` of an image file: a rewritten image changes the key without reading
    every image; a missing one gets a stamp of its own (its read fails with a clear error)."""
    try:
        st = os.stat(item)
    except (OSError, TypeError, ValueError):
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _inputs_sha256(parts: Dict[str, dsets.LabeledImages]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("train", "test"):
        h.update(np.asarray(parts[key].labels).tobytes())
        items = parts[key].items
        if isinstance(items, np.ndarray):  # decoded images (Fashion-MNIST): the pixels
            h.update(items.tobytes())
        else:
            for item in items:
                h.update(f"{item}\t{_file_stamp(item)}\n".encode())
    return h.hexdigest()


def _cache_key(model: Any, spec: str, dname: str, data: "DataOptions", fopts: "FeatureOptions",
               parts: Dict[str, dsets.LabeledImages]) -> Tuple[str, Dict[str, Any]]:
    import hashlib
    import json

    preprocess = getattr(model, "preprocess_config", None)
    desc = {"version": CACHE_KEY_VERSION,
            "model": {"spec": spec, "weights_sha256": weights_digest(model),
                      "head": "projector" if getattr(model, "has_projector", False)
                      else "backbone",
                      "preprocess": preprocess.to_dict() if preprocess is not None else None},
            "dataset": dname, "data": data.describe(), "image_size": fopts.image_size,
            "inputs_sha256": _inputs_sha256(parts)}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], desc


def _cached_features(model, spec, dname, data, fopts, parts, compute, log):
    """(Xtr, Xte) from ``fopts.cache`` when an identical run cached them, else computed+stored.

    Identical means the same weights (by content), the same images (paths, labels, sizes and
    modification times; the pixels for decoded sets), dataset options and image size.
    """
    if not fopts.cache:
        return compute()
    import json

    from .results import slug

    key, desc = _cache_key(model, spec, dname, data, fopts, parts)
    folder = Path(fopts.cache)
    path = folder / f"{slug(display_name(spec))}__{slug(dname)}__{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log(f"  features from cache {path}")
            return z["train"], z["test"]
    Xtr, Xte = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, train=Xtr, test=Xte, meta=np.array(json.dumps(desc, default=str)))
    os.replace(tmp, path)
    return Xtr, Xte

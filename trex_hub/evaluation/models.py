"""The models ``trex-eval run`` evaluates: display names, loading, and the recorded source."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .feature_sets import feature_folder
from .options import DataOptions

RANDOM_PREFIX = "random:"
RANDOM_INIT_SEED = 0


def display_name(spec: str) -> str:
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_PREFIX + display_name(spec[len(RANDOM_PREFIX):])
    p = Path(spec).expanduser()
    if p.exists():
        return p.stem if p.is_file() else p.name
    return spec


def load_model(spec: str, device: str, projector: bool = False, ema: bool = False):
    import trex_hub

    if spec.startswith(RANDOM_PREFIX):
        import torch

        # deterministic random weights: the same random:NAME gives the same model every run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return trex_hub.load(spec[len(RANDOM_PREFIX):], pretrained=False, device=device,
                                 projector=projector, ema=ema)
    return trex_hub.load(spec, device=device, projector=projector, ema=ema)


def _spec_source(spec: str) -> str:
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_PREFIX + _spec_source(spec[len(RANDOM_PREFIX):])
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def model_source(spec: Optional[str], data: DataOptions, several: bool) -> str:
    """What a result is computed from, recorded as its ``model_source``: the absolute path of a
    local checkpoint, exported folder or feature folder, else the registry name or hf-hub id.

    Unlike the display name it tells two ``runs/*/checkpoint.pth`` apart, so a later run can
    see that the result file it is about to replace belongs to another model.
    """
    if data.format == "features":
        return str(feature_folder(data.data or ".", spec, several).resolve())
    return _spec_source(str(spec))

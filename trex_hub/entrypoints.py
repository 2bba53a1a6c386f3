"""torch.hub entrypoints, one per registry model (``hubconf.py`` re-exports them)."""
from __future__ import annotations

from typing import Any, Callable, List

from .registry import MODELS, ModelEntry


def _make(entry: ModelEntry) -> Callable[..., Any]:
    def entrypoint(pretrained: bool = True, **kwargs: Any):
        from .api import load

        return load(entry.name, pretrained=pretrained, **kwargs)

    extra = (" Pass projector=True for the 256-d projector and classify()."
             if entry.has_projector else "")
    entrypoint.__name__ = entrypoint.__qualname__ = entry.name
    entrypoint.__doc__ = (
        f"{entry.title}: {entry.description} ImageNet-1K top-1 {entry.imagenet_top1}, mean "
        f"transfer log-odds {entry.transfer_log_odds}.{extra} Keyword arguments go to "
        "trex_hub.load (device, projector, cache_dir, progress...).")
    return entrypoint


__all__: List[str] = []
for _entry in MODELS.values():
    globals()[_entry.name] = _make(_entry)
    __all__.append(_entry.name)

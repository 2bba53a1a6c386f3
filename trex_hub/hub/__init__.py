"""Getting files: ``http`` (transport), ``cache`` (the trex_hub cache and its policy),
``partials`` (partial downloads), ``hf`` (the Hugging Face Hub); ``download`` keeps the original
module's names.

Nothing in this package knows about torch modules or the registry of models.
"""
from importlib import import_module as _import_module

__all__ = ["cache", "download", "hf", "http", "partials"]


def __getattr__(name: str):
    """``trex_hub.hub.download.set_mirror(...)`` after a bare ``import trex_hub``: each module
    is imported on first use (nothing here is imported before it is needed)."""
    if name in __all__:
        return _import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(n for n in set(globals()) | set(__all__) if not n.startswith("_")
                  or n.startswith("__"))

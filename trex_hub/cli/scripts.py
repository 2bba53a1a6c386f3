"""The console scripts (``[options.entry_points]`` in setup.cfg).

Each runs its program's ``main`` and ends the process through
:func:`~trex_hub.cli.common.exit_now`; ``main(argv)`` itself returns the exit code, for callers
that stay in the same process. (A module of their own: in ``trex_hub/cli/__init__.py`` a function
``extract`` would be replaced by the submodule of that name as soon as it is imported.)
"""
from importlib import import_module
from typing import NoReturn


def _program(name: str) -> NoReturn:
    from .common import exit_now

    exit_now(import_module(f"{__package__}.{name}").main())


def download() -> NoReturn:
    """``trex-download``"""
    _program("download")


def extract() -> NoReturn:
    """``trex-extract``"""
    _program("extract")


def eval() -> NoReturn:  # noqa: A001 - named after trex-eval; no builtin eval is used here
    """``trex-eval``"""
    _program("eval")


def train() -> NoReturn:
    """``trex-train``"""
    _program("train")

"""The error convention shared by trex-download, trex-extract, trex-eval and trex-train.

A program ends with an exit code and, when something went wrong, one line on stderr that names
the problem and the fix:

    PROG: error: <what and how to fix it>       exit 1 (failure) or 2 (usage error)
    PROG: interrupted; <how to continue>        exit 130 (Ctrl-C)

argparse's own usage errors keep argparse's message and exit 2; ``--help`` exits 0. With
``--debug`` (or ``TREX_HUB_DEBUG=1`` in the environment) the traceback is printed above that line.
An exception no program expected still ends in one line (``error: unexpected <type>: ...``, exit
1), never a bare traceback.

A program's ``main`` is ``run_cli(prog, parse, body)``; inside ``body`` a problem is raised as a
:class:`CliError` / :class:`UsageError`, or library errors are turned into one with
``with failing_on(SomeError, ...):``.

A console script ends through :func:`exit_now`: the exit handlers run and the streams are
flushed as on a normal exit, but the interpreter's teardown (freeing thousands of torch modules:
1-2 s after importing torch and torchvision) is skipped. ``TREX_HUB_CLEAN_EXIT=1`` keeps the full
teardown, for tools that need it (leak checkers).
"""
from __future__ import annotations

import argparse
import atexit
import math
import os
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional, Tuple, Union

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "TREX_HUB_DEBUG"
CLEAN_EXIT_ENV = "TREX_HUB_CLEAN_EXIT"


class CliError(Exception):
    """Stops a program with ``PROG: error: <message>`` and exit code ``code``."""

    code = EXIT_FAIL

    def __init__(self, message: str, code: Union[int, None] = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CliError):
    """The command line asks for something impossible (exit 2)."""

    code = EXIT_USAGE


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    raise CliError(message, code)


@contextmanager
def failing_on(*errors: type, code: int = EXIT_FAIL) -> Iterator[None]:
    """Turn the ``errors`` raised inside the block into a :class:`CliError` with ``code``."""
    try:
        yield
    except errors as exc:
        raise CliError(str(exc), code) from exc


class HelpFormatter(argparse.HelpFormatter):
    """``(default: X)`` after an option's help only where it tells something: not for flags
    (``store_true`` / ``store_false``), required options, ``None`` defaults, or help that
    already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def nonempty(text: str) -> str:
    """argparse ``type=`` for a path option: ``--cache-dir "$UNSET"`` must not mean ``.``."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave the option out for its "
                                         "default)")
    return text


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse ``type=``: an integer ``>= low`` (and ``<= high``); a bad value is a usage error
    naming the option (argparse adds "argument --OPTION:") and what it takes."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            where = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, open_low: bool = False,
              open_high: bool = True) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high`` (``open_*``: that end excluded)."""
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    where = (f"> {low:g}" if open_low else f">= {low:g}") if high == math.inf else \
        f"in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (math.isfinite(value) and (value > low if open_low else value >= low)
                  and (value < high if open_high else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    return parse


def add_debug_flag(parser: argparse.ArgumentParser, also: str = "") -> None:
    """``--debug``; ``also`` names what else it prints."""
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, also print the traceback{also} (or set "
                             f"{DEBUG_ENV}=1)")


def debug_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _exit_code(exc: SystemExit) -> int:
    """argparse's exit: 0 for --help, 2 for a usage error (already printed)."""
    if exc.code is None or isinstance(exc.code, int):
        return int(exc.code or 0)
    print(exc.code, file=sys.stderr, flush=True)  # sys.exit("message") style
    return EXIT_USAGE


def run_cli(prog: Union[str, Callable[[argparse.Namespace], str]],
            parse: Callable[[], argparse.Namespace],
            body: Callable[[argparse.Namespace], int], *,
            interrupted: str = "interrupted", suffix: str = "") -> int:
    """Parse the command line, run ``body(args)`` and return its exit code; a
    :class:`CliError` or Ctrl-C becomes one line on stderr and 1/2/130.

    ``prog`` is the name that starts the line (a function of the parsed arguments for programs
    with sub-commands), ``interrupted`` what to say after Ctrl-C, ``suffix`` what to add to every
    such line (e.g. the torchrun rank).
    """
    try:
        args = parse()
    except SystemExit as exc:
        return _exit_code(exc)
    name = prog(args) if callable(prog) else prog
    try:
        return int(body(args))
    except CliError as exc:
        code, line = exc.code, f"error: {exc}"
        if debug_wanted(args):
            traceback.print_exc()
    except KeyboardInterrupt:
        code, line = EXIT_INTERRUPTED, interrupted
        if debug_wanted(args):
            traceback.print_exc()
    except SystemExit as exc:  # parser.error() called by the body
        return _exit_code(exc)
    except MemoryError as exc:
        code, line = EXIT_FAIL, (f"error: out of memory{f' ({exc})' if str(exc) else ''}; free "
                                 "some memory (or lower -b / --workers where the program has "
                                 "them), then run again")
        if debug_wanted(args):
            traceback.print_exc()
    except Exception as exc:  # a case nobody foresaw: still one line
        code = EXIT_FAIL
        line = (f"error: unexpected {type(exc).__name__}: {exc}"
                + ("" if debug_wanted(args) else " (rerun with --debug for the traceback)"))
        if debug_wanted(args):
            traceback.print_exc()
    print(f"{name}: {line}{suffix}", file=sys.stderr, flush=True)
    return code


def torchrun_ranks() -> Tuple[int, int, int]:
    """``(rank, number of processes, local rank)`` from torchrun's environment; ``(0, 1, 0)``
    for a process on its own (read without importing torch)."""
    return (int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1),
            int(os.environ.get("LOCAL_RANK", "0") or 0))


def process_age() -> Optional[float]:
    """Seconds since this process started (Linux, to 10 ms), or ``None`` where that is unknown:
    the interpreter's start and the imports, when read as a program's ``main`` begins."""
    try:
        with open("/proc/self/stat") as fh:  # field 22, starttime: clock ticks since boot
            start = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as fh:
            return max(0.0, float(fh.read().split()[0]) - start)
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_threads() -> None:
    """The interpreter's first exit step (``threading._shutdown``, which CPython calls at exit;
    checked on 3.9 to 3.13): ``threading``'s own exit callbacks, then a wait for every
    non-daemon thread. The callbacks must come first: the idle workers of a
    ``ThreadPoolExecutor`` never shut down (torch.compile leaves one) end only on the wake-up
    that ``concurrent.futures`` registers there, so joining them first waits for ever. Where
    that function is missing, the threads are joined."""
    shutdown = getattr(threading, "_shutdown", None)
    if callable(shutdown):
        shutdown()
        return
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` the way a normal exit does, minus the interpreter's
    teardown: wait for the non-daemon threads as the interpreter does (:func:`_wait_for_threads`),
    run the ``atexit`` handlers (multiprocessing's worker clean-up, logging, temporary folders),
    flush the standard streams, then ``os._exit``. Every file the programs write is closed
    before ``main`` returns (atomic writes), so nothing is left in a buffer that only the
    teardown would have flushed. (Looking for such files among the live objects costs 0.15-0.5 s
    after importing torch.) With ``TREX_HUB_CLEAN_EXIT=1``, a plain ``sys.exit``."""
    if os.environ.get(CLEAN_EXIT_ENV, "") not in ("", "0"):
        sys.exit(code)
    _wait_for_threads()
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):  # closed pipe (`| head`) or no stream
                pass
        os._exit(code)


__all__ = ["EXIT_OK", "EXIT_FAIL", "EXIT_USAGE", "EXIT_INTERRUPTED", "CliError", "UsageError",
           "fail", "failing_on", "HelpFormatter", "nonempty", "int_at_least", "float_in",
           "add_debug_flag", "debug_wanted",
           "run_cli", "exit_now", "process_age", "torchrun_ranks"]

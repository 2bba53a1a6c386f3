"""The start of a process group for ``trex-extract`` and ``trex-train`` (several processes).

Under torchrun the peers exist already (torchrun's agents met first): the group starts through
``env://`` as before. Without torchrun (a job script exporting ``RANK`` / ``WORLD_SIZE`` itself,
``srun`` without torchrun, a copied script that left them set):

* ``MASTER_ADDR`` or ``MASTER_PORT`` missing is one line naming the variable and the fixes,
  instead of torch's "env:// rendezvous ... expected, but not set";
* the processes meet on a ``TCPStore`` of their own, made with a timeout for the meeting only
  (``TREX_HUB_RENDEZVOUS_TIMEOUT`` seconds, default 600): a process that waits says so once
  (how many processes are missing, where), and gives up after that time instead of the
  collectives' timeout (days, for trex-extract, whose ranks wait for rank 0's merge). Once all
  are there, the store takes the collectives' timeout and is handed to
  ``init_process_group(store=...)``.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

TIMEOUT_ENV = "TREX_HUB_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
GRACE_S = 3.0  # peers started together arrive within this: no "waiting" line before it
_JOINED = "trex_hub/joined"


class RendezvousError(RuntimeError):
    """The processes of a run cannot meet; the message says why and what to change."""


def rendezvous_timeout() -> float:
    """Seconds a process waits for the others to arrive (``TREX_HUB_RENDEZVOUS_TIMEOUT``, > 0;
    a bad value is a :class:`RendezvousError` naming it)."""
    from .hub.http import env_float

    return env_float(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, above=True, error=RendezvousError)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_USE_AGENT_STORE" in os.environ


def check_environment(rank: int, world: int) -> None:
    """A several-process run needs ``MASTER_ADDR`` and ``MASTER_PORT``: one line otherwise."""
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise RendezvousError(
                f"WORLD_SIZE={world} and RANK={rank} are set but {var} is not: launch with "
                "torchrun (or srun + torchrun), set MASTER_ADDR and MASTER_PORT (the address "
                "and a free port of the rank-0 machine), or unset WORLD_SIZE and RANK to run "
                "one process")
    port = os.environ["MASTER_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RendezvousError(f"MASTER_PORT={port!r} is not a port number (1 to 65535)")


def _reach(addr: str, port: int, deadline: float) -> None:
    """Return once something listens at ``addr:port``; ``TimeoutError`` after ``deadline``."""
    import socket

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nobody listens there")
        try:
            socket.create_connection((addr, port), timeout=min(left, 2.0)).close()
            return
        except OSError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def meet(rank: int, world: int, timeout: timedelta, say: Callable[[str], None],
         wait_s: Optional[float] = None):
    """The processes' own ``TCPStore`` once all ``world`` of them reached it (rank 0 hosts it
    at ``MASTER_ADDR:MASTER_PORT``), with ``timeout`` (the collectives') as its timeout. A
    process still waiting after :data:`GRACE_S` says so once through ``say``; after ``wait_s``
    (:func:`rendezvous_timeout`) it raises :class:`RendezvousError`."""
    import torch.distributed as dist

    check_environment(rank, world)
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait_s = rendezvous_timeout() if wait_s is None else wait_s
    where = f"{addr}:{port}"
    start = time.monotonic()
    said = threading.Event()

    def waiting(what: str) -> None:
        if not said.is_set():
            said.set()
            say(f"waiting for {what} at {where} (WORLD_SIZE={world}, this is RANK={rank}); "
                f"giving up after {wait_s:g} s ({TIMEOUT_ENV})")

    give_up = (f"start every process with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE "
               "(torchrun does), or unset WORLD_SIZE and RANK to run one process; "
               f"{TIMEOUT_ENV} sets the wait in seconds")
    timer = None
    if rank != 0:
        timer = threading.Timer(min(GRACE_S, wait_s / 3), waiting, ("the rank-0 process",))
        timer.daemon = True
        timer.start()
    try:
        if rank != 0:  # torch's own retries log a C++ stack per try: reach the port first
            _reach(addr, port, start + wait_s)
        store = dist.TCPStore(addr, port, world, is_master=rank == 0,
                              timeout=timedelta(seconds=wait_s), wait_for_workers=False)
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if rank == 0:
            raise RendezvousError(f"cannot host the run's meeting point at {where} ({first}): "
                                  "set MASTER_PORT to a free port (the same in every process)"
                                  ) from None
        raise RendezvousError(f"the rank-0 process of this run did not answer at {where} "
                              f"within {wait_s:g} s; {give_up}") from None
    finally:
        if timer is not None:
            timer.cancel()
    store.add(_JOINED, 1)
    while True:
        joined = store.add(_JOINED, 0)
        if joined >= world:
            break
        elapsed = time.monotonic() - start
        if elapsed > wait_s:
            raise RendezvousError(f"only {joined} of the {world} processes of this run "
                                  f"(WORLD_SIZE={world}) reached {where} within {wait_s:g} s; "
                                  f"{give_up}")
        if elapsed > min(GRACE_S, wait_s / 3):
            missing = world - joined
            waiting(f"{missing} more process{'es' if missing > 1 else ''}")
        time.sleep(0.05)
    store.set_timeout(timeout)
    return store


def init_group(backend: str, timeout: Optional[timedelta], rank: int, world: int,
               say: Callable[[str], None]) -> None:
    """``torch.distributed.init_process_group`` for this run: ``env://`` under torchrun, else
    :func:`meet` first. ``timeout`` is the collectives' (None: torch's default)."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    given = {} if timeout is None else {"timeout": timeout}  # None: the backend's default
    if _under_torchrun():
        check_environment(rank, world)
        dist.init_process_group(backend, **given)
        return
    store = meet(rank, world, timeout or default_pg_timeout, say)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, **given)


__all__ = ["RendezvousError", "init_group", "meet", "check_environment", "rendezvous_timeout",
           "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

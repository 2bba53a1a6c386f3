"""What a training process stands on: processes and devices (torchrun / DDP), RNG states, and the
atomic checkpoints that ``--resume`` continues from bit for bit."""
from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .module import TrainModule

CHECKPOINT_NAME = "checkpoint.pth"


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# processes and devices
# ---------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read the torchrun environment and start the process group (NCCL on CUDA, gloo on CPU)."""
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {device} was asked for but CUDA is not available; "
                                "use --device cpu")
        use_cuda = True
    elif device == "cpu":
        use_cuda = False
    else:
        raise TrainingError(f"unknown --device '{device}' (auto, cpu or cuda)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank, world, local, dev)
    if world > 1:
        env.backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            from ..rendezvous import RendezvousError, init_group

            def note(msg: str) -> None:
                print(f"[trex-train] {msg}", file=sys.stderr, flush=True)

            try:  # the collectives keep the backend's default timeout
                init_group(env.backend, None, rank, world, note)
            except RendezvousError as exc:
                raise TrainingError(str(exc)) from None
    return env


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` in rank order (same shape on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# one error line for a run of several processes
# ---------------------------------------------------------------------------------------------
FAILED_KEY, REPORTED_KEY = "trex_train/failed", "trex_train/reported"
REPORT_WAIT_S = 30.0  # how long a quiet process waits for the reporting one's line
LINGER_S = 10.0  # how long a quiet process outlives an error met alike by every process
# what gloo and NCCL raise in a process whose peer is gone (its sockets closed)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited", "NCCL communicator was aborted")
_REPORTING: List[Any] = []  # the store of a failure this process reports (once it is printed)


class FailedElsewhere(RuntimeError):
    """This process stops because another process of the run failed first, and that one reports
    its error: ``trex-train`` prints nothing for this one and exits 1."""


def reports_alike_errors() -> bool:
    """Whether this process reports the errors that every process of a machine meets alike
    before the group exists (a usage error, a missing device): local rank 0 of a torchrun run,
    or a process on its own. The others stay quiet and :func:`linger`."""
    return (int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
            or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0)


def linger() -> None:
    """Wait before ending a quiet process: torchrun stops every process as soon as one ends,
    and would stop the one that reports the error before its line is out."""
    import time

    time.sleep(LINGER_S)


def _group_store() -> Any:
    """The store of the process group (the torchrun agent's, or rank 0's), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _peer_gone(exc: BaseException) -> Optional[str]:
    """gloo's or NCCL's words for a lost peer in a failed collective (``exc``), without the
    source location and the advice after them; None for any other error."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or isinstance(exc, TrainingError):
        return None
    for words in _PEER_GONE:
        end = text.find(words)
        if end >= 0:
            said = text[:end + len(words)].strip()
            return said.split("] ", 1)[1] if said.startswith("[") and "] " in said else said
    return None


def record_for_torchrun(message: str) -> None:
    """The error in torchrun's error file, so that its closing summary shows it as the root
    cause rather than a link to the docs (torchrun's ``@record`` layout, no traceback)."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass


def failure_in_group(exc: Exception, env: DistEnv) -> Exception:
    """What a process of a distributed run raises for its failure ``exc``, so that the run
    ends with one error line: ``exc`` itself when it is the run's first failure (this process
    reports it); :class:`FailedElsewhere` when another process failed first (it reports its
    own; this one waits, at most :data:`REPORT_WAIT_S`, for :func:`failure_reported`, so that
    torchrun, which stops every process when one ends, does not stop the reporting one before
    its line is out); a :class:`TrainingError` saying that another process ended without a
    word when ``exc`` is only the lost connection to it.

    The first failure is the first one recorded in the group's store, before this process
    closes its connections: a process whose collective failed because a peer was gone finds
    that peer's record there. Without a usable store every process reports its own error.
    """
    from ..transforms import ImageLoadError

    store = _group_store()
    gone = _peer_gone(exc)
    what = str(exc) if isinstance(exc, (TrainingError, ImageLoadError)) else \
        f"{type(exc).__name__}: {exc}"
    if gone:
        what = (f"another process of this run ended without a message (this one lost its "
                f"connection to it: {gone}); look for its error above, and for its exit code "
                "or signal in torchrun's summary")
    mine = f"{env.rank}:{what}"
    try:
        if store is None:
            raise RuntimeError("no store")
        if gone and store.check([FAILED_KEY]):
            first = store.get(FAILED_KEY).decode()
        else:
            first = store.compare_set(FAILED_KEY, "", mine).decode()
    except Exception:  # the store went with a failed process (rank 0 hosts it without torchrun)
        first = mine
    if first != mine:
        rank, _, message = first.partition(":")
        record_for_torchrun(f"stopped: rank {rank} failed first: {message}")
        try:
            store.wait([REPORTED_KEY], timedelta(seconds=REPORT_WAIT_S))
        except Exception:
            pass
        return FailedElsewhere(f"rank {rank} failed: {message}")
    record_for_torchrun(what)
    if store is not None:
        _REPORTING.append(store)  # kept past the group's end, for failure_reported
    return TrainingError(what) if gone else exc


def failure_reported() -> None:
    """Tell the processes that wait in :func:`failure_in_group` that the error line is out."""
    while _REPORTING:
        try:
            _REPORTING.pop().set(REPORTED_KEY, "1")
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# RNG states (plain tensors / tuples only: the checkpoint stays weights_only-loadable)
# ---------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)



# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_dict(module: TrainModule, optimizer: torch.optim.Optimizer, scaler: Any,
                    epoch: int, args: argparse.Namespace, rng_states: List[Any]) -> Dict[str, Any]:
    """The released full-checkpoint layout (+ ``rng_states``, one entry per process)."""
    # contiguous: a channels_last run writes the same plain layout as any other
    model = {f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return {"model": model, "optimizer": optimizer.state_dict(), "epoch": int(epoch),
            "args": args, "fp16_scaler": scaler.state_dict(), "rng_states": rng_states}


def save_checkpoint(obj: Dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename (atomic)."""
    from ..fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _shown(value: Any) -> str:
    """An option's value as it is written on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _class_difference(old: List[str], new: List[str]) -> str:
    """Where two class lists part: their sizes, or the first name that differs (an ImageNet
    list is too long to print)."""
    if len(old) != len(new):
        return f"{len(old)} classes (this run: {len(new)})"
    k = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return f"class {k} '{old[k]}' (this run: '{new[k]}')"


def setting_differences(saved: Any, current: argparse.Namespace) -> List[str]:
    """``--option OLD (this run: NEW)`` for each option of ``RESUME_MUST_MATCH`` in which the
    checkpoint's ``args`` and this run differ, in that order (the architecture first). An option
    an older checkpoint does not record is not compared."""
    from .config import RESUME_MUST_MATCH

    missing = object()
    out = []
    for key, label in RESUME_MUST_MATCH.items():
        old, new = getattr(saved, key, missing), getattr(current, key, missing)
        if old is missing or new is missing:
            continue
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = list(old), list(new)
        if old == new:
            continue
        if key == "class_names":
            out.append(f"{label}: {_class_difference(old, new)}")
        else:
            out.append(f"{label} {_shown(old)} (this run: {_shown(new)})")
    return out


def _network_difference(module: TrainModule, state: Dict[str, torch.Tensor]) -> str:
    """A short account of why ``state`` does not load into ``module`` (torch's message lists
    every key: tens of kilobytes for a ResNet)."""
    mine = module.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [k for k in mine if k in state and tuple(mine[k].shape) != tuple(state[k].shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("of another shape", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 2 else ""
            parts.append(f"{len(keys)} weight(s) {what} ({', '.join(keys[:2])}{more})")
    return "; ".join(parts) or "the weights do not load"


def resume_from(path: Path, module: TrainModule, optimizer: torch.optim.Optimizer, scaler: Any,
                schedule: np.ndarray, env: DistEnv,
                args: Optional[argparse.Namespace] = None) -> int:
    """Load a checkpoint written by this loop; returns the number of epochs already done.

    ``args`` (the ``args`` this run will save) must agree with the checkpoint's in every
    option that defines what is learnt (``config.RESUME_MUST_MATCH``), and the lr schedule
    must be the same: otherwise the run would go on with weights, memory labels or crops that
    no longer fit, and the final checkpoint's ``args`` would describe only the new settings."""
    from ..checkpoint import CheckpointError, CheckpointReadError, torch_load

    try:
        ckpt = torch_load(path)
    except (CheckpointError, CheckpointReadError) as exc:
        raise TrainingError(f"cannot resume: {exc}") from None
    saved = ckpt.get("args")
    differ = setting_differences(saved, args) if args is not None else []
    if differ:
        raise TrainingError(
            f"cannot resume from {path}: it was trained with other settings: "
            f"{', '.join(differ)}. Give the checkpoint's values to continue it, or start a new "
            "run (another --output-dir, or --overwrite)")
    old = getattr(saved, "lr_schedule", None)
    if old is None or len(old) != len(schedule) or not np.array_equal(old, schedule):
        raise TrainingError(
            f"cannot resume from {path}: its lr schedule ({0 if old is None else len(old)} "
            f"iterations) differs from this run's ({len(schedule)}); resume with the same "
            "--epochs, --batch-size, number of processes, --lr, --warmup-epochs and data")
    state = {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in ckpt["model"].items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        raise TrainingError(f"cannot resume from {path}: the network differs: "
                            f"{_network_difference(module, state)}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # momentum in the parameters' layout (channels_last)
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf.stride() != p.stride():
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
    if ckpt.get("fp16_scaler"):
        scaler.load_state_dict(ckpt["fp16_scaler"])
    states = ckpt.get("rng_states") or []
    if len(states) == env.world_size:
        set_rng_state(states[env.rank], env.device)
    elif env.is_main:
        print(f"[trex-train] {path} holds RNG states of {len(states)} processes, this run has "
              f"{env.world_size}: RNG states not restored", file=sys.stderr)
    return int(ckpt["epoch"])




__all__ = ["TrainingError", "DistEnv", "setup_distributed", "all_gather_cat", "all_gather_objects",
           "FailedElsewhere", "failure_in_group", "failure_reported", "reports_alike_errors",
           "linger", "record_for_torchrun",
           "rng_state", "set_rng_state", "checkpoint_dict", "save_checkpoint", "resume_from",
           "setting_differences", "CHECKPOINT_NAME"]

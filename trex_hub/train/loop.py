"""The training loop: data, DDP, AMP, per-iteration schedule, EMA, logs, atomic checkpoints, resume.

Run it with :func:`train` (``trex-train`` parses the options, see :mod:`trex_hub.train.config`).
Under ``torchrun`` every process runs the same code: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` come
from the environment, NCCL is used on GPUs and gloo on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .augment import MultiCrop, MultiCropDataset, eval_transform
from .config import plain_namespace, projector_config
from .module import TrainModule, param_groups
from .schedule import lr_schedule, peak_lr

CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"


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
            dist.init_process_group(backend=env.backend)
    return env


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` in rank order (same shape on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _all_gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


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
# data
# ---------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace):
    """(train, val or None) as :class:`trex_hub.datasets.LabeledImages`."""
    from .. import datasets as ds

    try:
        if args.dataset == "fashion-mnist":
            train = ds.load_fashion_mnist(args.data, "train", classes=args.classes,
                                          limit=args.train_limit, seed=args.data_seed)
            val = None if args.no_val else ds.load_fashion_mnist(
                args.data, "test", classes=args.classes, limit=args.val_limit,
                seed=args.data_seed)
        else:
            if not args.data:
                raise TrainingError("--data is required: an ImageFolder root with train/ and val/ "
                                    "class folders (or --dataset fashion-mnist)")
            parts = ds.load_image_folder(args.data, classes=args.classes, seed=args.data_seed)
            train, val = parts["train"], (None if args.no_val else parts["test"])
            if args.train_limit:
                train = train.subset(ds.balanced_subset(train.labels, args.train_limit,
                                                        args.data_seed))
            if val is not None and args.val_limit:
                val = val.subset(ds.balanced_subset(val.labels, args.val_limit, args.data_seed))
    except (ds.DatasetError, ValueError) as exc:
        if isinstance(exc, TrainingError):
            raise
        raise TrainingError(str(exc)) from None
    if len(train) == 0:
        raise TrainingError("the training set is empty")
    return train, val


def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[str, Optional[torch.dtype]]:
    mode = args.amp
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "none"
    if mode == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs CUDA (GradScaler); on CPU use --amp bf16 or none")
    return mode, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)


def _use_sync_bn(args: argparse.Namespace, env: DistEnv) -> bool:
    if args.sync_bn == "off" or not env.distributed:
        return False
    if env.device.type != "cuda":
        if args.sync_bn == "on":
            raise TrainingError("--sync-bn on needs CUDA: SyncBatchNorm has no CPU kernel. On "
                                "CPU each process normalises with its own batch statistics")
        return False
    return True


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_dict(module: TrainModule, optimizer: torch.optim.Optimizer, scaler: Any,
                    epoch: int, args: argparse.Namespace, rng_states: List[Any]) -> Dict[str, Any]:
    """The released full-checkpoint layout (+ ``rng_states``, one entry per process)."""
    model = {f"module.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
    return {"model": model, "optimizer": optimizer.state_dict(), "epoch": int(epoch),
            "args": args, "fp16_scaler": scaler.state_dict(), "rng_states": rng_states}


def save_checkpoint(obj: Dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename (atomic)."""
    from ..fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def resume_from(path: Path, module: TrainModule, optimizer: torch.optim.Optimizer, scaler: Any,
                schedule: np.ndarray, env: DistEnv) -> int:
    """Load a checkpoint written by this loop; returns the number of epochs already done."""
    from ..checkpoint import CheckpointError, torch_load

    try:
        ckpt = torch_load(path)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {exc}") from None
    saved = ckpt.get("args")
    old = getattr(saved, "lr_schedule", None)
    if old is None or len(old) != len(schedule) or not np.array_equal(old, schedule):
        raise TrainingError(
            f"cannot resume from {path}: its lr schedule ({0 if old is None else len(old)} "
            f"iterations) differs from this run's ({len(schedule)}); resume with the same "
            "--epochs, --batch-size, number of processes, --lr, --warm-up and data")
    state = {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in ckpt["model"].items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TrainingError(f"cannot resume from {path}: the network differs ({exc})") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("fp16_scaler"):
        scaler.load_state_dict(ckpt["fp16_scaler"])
    states = ckpt.get("rng_states") or []
    if len(states) == env.world_size:
        set_rng_state(states[env.rank], env.device)
    elif env.is_main:
        print(f"[trex-train] {path} holds RNG states of {len(states)} processes, this run has "
              f"{env.world_size}: RNG states not restored", file=sys.stderr)
    return int(ckpt["epoch"])


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(module: TrainModule, val_data: Any, args: argparse.Namespace, env: DistEnv,
             amp_dtype: Optional[torch.dtype]) -> float:
    """Top-1 (%) of the online network with the current prototypes / classifier."""
    from ..datasets import ImageDataset

    dataset = ImageDataset(val_data, eval_transform(args.global_size))
    shard = Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))
    loader = DataLoader(shard, batch_size=max(1, args.batch_size), shuffle=False,
                        num_workers=args.workers, pin_memory=env.device.type == "cuda")
    net = module.model
    was_training = net.training
    net.eval()
    protos = module.memory.prototypes() if module.memory is not None else None
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device)
        with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = module.logits(net([images]), protos)
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.numel()
    if env.distributed:
        dist.all_reduce(counts)
    net.train(was_training)
    return float(100.0 * counts[0] / counts[1].clamp_min(1))


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[trex-train] {msg}", file=sys.stderr, flush=True)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or continue) a training; returns the last epoch's log record."""
    env = setup_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, env: DistEnv) -> Dict[str, Any]:
    out_dir = Path(args.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = bool(args.deterministic)

    train_data, val_data = load_data(args)
    from ..datasets import ImageDataset

    crops = MultiCrop(global_size=args.global_size, global_scale=args.global_scale,
                      n_global=args.global_crops, local_size=args.local_size,
                      local_scale=args.local_scale, n_local=args.local_crops,
                      blur_radius=args.blur_radius, simple=bool(args.simple_aug))
    train_ds = MultiCropDataset(ImageDataset(train_data), crops, seed=args.seed)
    sampler = DistributedSampler(train_ds, num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.workers, pin_memory=env.device.type == "cuda",
                        drop_last=True)
    niter = len(loader)
    global_batch = args.batch_size * env.world_size
    if niter == 0:
        raise TrainingError(f"{len(train_ds)} training images do not make one batch of "
                            f"{args.batch_size} x {env.world_size} processes")
    peak = peak_lr(args.lr, global_batch, args.lr_ref_batch)
    schedule = lr_schedule(peak, args.min_lr, args.epochs, niter, args.warmup_epochs)
    num_classes = train_data.num_classes

    # identical initialisation on every process (DDP also broadcasts rank 0's weights)
    module = TrainModule(args.arch, projector_config(args), num_classes, args.tau,
                         args.memory_size, args.classifier, args.global_crops)
    torch.manual_seed(args.seed + env.rank)
    sync_bn = _use_sync_bn(args, env)
    if sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module.to(env.device)
    optimizer = torch.optim.SGD(param_groups(module, args.weight_decay, not args.wd_all), lr=0.0,
                                momentum=args.momentum, nesterov=False)
    amp_mode, amp_dtype = _amp(args, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_mode == "fp16")

    start_epoch = 0
    if args.resume:
        path = out_dir / CHECKPOINT_NAME if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            start_epoch = resume_from(path, module, optimizer, scaler, schedule, env)
            _log(env, f"resumed from {path} after epoch {start_epoch}")
        elif args.resume == "auto":
            _log(env, f"--resume: no {path} yet, starting from scratch")
        else:
            raise TrainingError(f"--resume {path}: no such file")

    net: nn.Module = module
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        gather = all_gather_cat
    bn_note = ("SyncBatchNorm" if sync_bn else
               "per-process BatchNorm (SyncBatchNorm needs CUDA)" if env.distributed else
               "BatchNorm")
    _log(env, f"{args.preset}: {args.arch}, {num_classes} classes, {len(train_ds)} images, "
              f"{env.world_size} process(es) x {args.batch_size} = batch {global_batch}, "
              f"{niter} it/epoch, peak lr {peak:.4g}, amp {amp_mode}, {bn_note}, "
              f"{env.device.type}")

    dump_dir = Path(args.debug_dump) if args.debug_dump else None
    saved_args = plain_namespace(
        args, lr_schedule=schedule, num_classes=int(num_classes),
        class_names=[str(c) for c in train_data.class_names], world_size=env.world_size,
        iters_per_epoch=int(niter), peak_lr=float(peak), projector_l2_norm=bool(
            args.projector_l2_norm and not args.no_projector))
    record: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        meters = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
        t0 = time.time()
        for it, (images, labels) in enumerate(loader):
            step = epoch * niter + it
            lr = float(schedule[step])
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [x.to(env.device, non_blocking=True) for x in images]
            labels = labels.to(env.device, non_blocking=True)
            before = _dump_before(module, env) if dump_dir else None
            with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss, logits, targets = net(images, labels, gather)
            bad = (~torch.isfinite(loss.detach())).float().reshape(1)
            if env.distributed:
                dist.all_reduce(bad)
            if bad.item() > 0:
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, iteration {it} "
                    f"(lr {lr:.4g}); stopping. Lower --lr, check the data, or use --amp none. "
                    f"The last good checkpoint is {out_dir / CHECKPOINT_NAME}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            module.update_ema(args.ema_momentum)
            n_glob = labels.shape[0] * args.global_crops
            meters[0] += loss.detach().double()
            meters[1] += (logits[:n_glob].argmax(-1) == targets[:n_glob]).sum()
            meters[2] += n_glob
            if dump_dir is not None:
                _dump_step(dump_dir, step, images, labels, before, module, env, args)
            if args.print_freq and (it % args.print_freq == 0 or it == niter - 1):
                _log(env, f"epoch {epoch + 1}/{args.epochs} [{it + 1}/{niter}] "
                          f"loss {loss.item():.4f} lr {lr:.4g}")
        if env.distributed:
            dist.all_reduce(meters)
        elapsed = time.time() - t0
        record = {"epoch": epoch + 1, "step": (epoch + 1) * niter,
                  "loss": float(meters[0] / (niter * env.world_size)),
                  "train_top1": float(100.0 * meters[1] / meters[2].clamp_min(1)),
                  "val_top1": None, "lr": float(schedule[(epoch + 1) * niter - 1]),
                  "images_per_s": float(niter * global_batch / max(elapsed, 1e-9)),
                  "epoch_time_s": round(elapsed, 3)}
        last = epoch + 1 == args.epochs
        if val_data is not None and args.eval_every and ((epoch + 1) % args.eval_every == 0
                                                         or last):
            record["val_top1"] = evaluate(module, val_data, args, env, amp_dtype)
        stopping = args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch
        every = max(1, int(args.checkpoint_every))
        keep = bool(args.save_every) and (epoch + 1) % args.save_every == 0
        if last or stopping or keep or (epoch + 1) % every == 0:
            states = _all_gather_objects(rng_state(env.device), env)
            if env.is_main:
                obj = checkpoint_dict(module, optimizer, scaler, epoch + 1, saved_args, states)
                save_checkpoint(obj, out_dir / CHECKPOINT_NAME)
                if keep:
                    save_checkpoint(obj, out_dir / f"checkpoint{epoch + 1:04d}.pth")
                del obj
        if env.is_main:
            with open(out_dir / LOG_NAME, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            val = "-" if record["val_top1"] is None else f"{record['val_top1']:.2f}"
            _log(env, f"epoch {epoch + 1}: loss {record['loss']:.4f} train top-1 "
                      f"{record['train_top1']:.2f} val top-1 {val} "
                      f"({record['images_per_s']:.1f} img/s)")
        if env.distributed:
            dist.barrier()
        if stopping and not last:
            _log(env, f"stopping after epoch {epoch + 1} (--stop-after-epoch); continue with "
                      "--resume")
            record["stopped"] = True
            break
    return record


# ---------------------------------------------------------------------------------------------
# test instrumentation (--debug-dump): what each process saw and held at every step
# ---------------------------------------------------------------------------------------------
def _dump_before(module: TrainModule, env: DistEnv) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if module.memory is not None:
        out["memory_features"] = module.memory.features.detach().cpu().clone()
        out["memory_labels"] = module.memory.labels.detach().cpu().clone()
        out["memory_ptr"] = module.memory.ptr.detach().cpu().clone()
    if env.is_main:
        out["ema_state"] = {k: v.detach().cpu().clone()
                            for k, v in module.model_ema.state_dict().items()}
    return out


def _dump_step(folder: Path, step: int, images: List[torch.Tensor], labels: torch.Tensor,
               before: Optional[Dict[str, Any]], module: TrainModule, env: DistEnv,
               args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = torch.cat([p.detach().cpu().reshape(-1) for _, p in module.trainable_parameters()])
    ema = torch.cat([p.detach().cpu().reshape(-1) for p in module.model_ema.parameters()])
    obj = {"step": step, "global_crops": [x.cpu() for x in images[:args.global_crops]],
           "labels": labels.cpu(), "params": params, "ema_params": ema, "before": before or {}}
    if module.memory is not None:
        obj["memory_features"] = module.memory.features.detach().cpu().clone()
        obj["memory_labels"] = module.memory.labels.detach().cpu().clone()
        obj["memory_ptr"] = module.memory.ptr.detach().cpu().clone()
    torch.save(obj, folder / f"step{step:05d}_rank{env.rank}.pt")


__all__ = ["train", "TrainingError", "DistEnv", "setup_distributed", "lr_schedule",
           "checkpoint_dict", "save_checkpoint", "resume_from", "evaluate", "load_data",
           "rng_state", "set_rng_state", "all_gather_cat", "CHECKPOINT_NAME", "LOG_NAME"]

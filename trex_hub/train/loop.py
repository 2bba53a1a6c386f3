"""The training loop: data, DDP, AMP, per-iteration schedule, EMA, logs, atomic checkpoints, resume.

Run it with :func:`train` (``trex-train`` parses the options, see :mod:`trex_hub.train.config`).
Under ``torchrun`` every process runs the same code: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` come
from the environment, NCCL is used on GPUs and gloo on CPU.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from .augment import eval_transform
from .config import plain_namespace, projector_config
from .data import (build_train_loader, device_batches, load_data, loader_batches,
                   resolve_aug, worker_kwargs)
from .module import TrainModule, param_groups
from .outputs import (LOG_NAME, append_log, clear_earlier_run, earlier_run, prepare_output_dir,
                      refuse_earlier_run, trim_log, write_checkpoint)
from .runtime import (CHECKPOINT_NAME, DistEnv, FailedElsewhere, TrainingError, all_gather_cat,
                      all_gather_objects, checkpoint_dict, failure_in_group, linger,
                      record_for_torchrun, reports_alike_errors, resume_from, rng_state,
                      save_checkpoint, set_rng_state, setup_distributed)
from .schedule import lr_schedule, peak_lr



def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[str, Optional[torch.dtype]]:
    mode = args.amp
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "none"
    if mode == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs CUDA (GradScaler); on CPU use --amp bf16 or none")
    return mode, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)


def _channels_last(args: argparse.Namespace, device: torch.device) -> bool:
    mode = getattr(args, "channels_last", "auto")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _check_every(args: argparse.Namespace, device: torch.device) -> int:
    """Steps between reads of the non-finite-loss flag: every step on CPU (reading is free
    there), ``--check-finite-every`` (default 50) on CUDA, where each read waits for the GPU."""
    every = int(getattr(args, "check_finite_every", 0) or 0)
    if every <= 0:
        every = 50 if device.type == "cuda" else 1
    return every


def build_optimizer(module: TrainModule, args: argparse.Namespace,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD; on CUDA the fused kernel (one launch for all parameters, and GradScaler hands it the
    inf check on the device instead of reading it every step). The CPU keeps the per-parameter
    loop, whose results the CPU tests pin down."""
    fused = device.type == "cuda"
    opt = torch.optim.SGD(param_groups(module, args.weight_decay, not args.wd_all), lr=0.0,
                          momentum=args.momentum, nesterov=False,
                          **({"fused": True} if fused else {}))
    if fused and args.momentum:
        # The fused kernel creates its momentum buffers with empty_like on the first step and
        # fills them in the kernel, which GradScaler skips when that step's gradients overflow
        # (usual at fp16's first steps, scale 2**16): the next step then reads uninitialised
        # memory and the weights turn NaN. Zero buffers give the same first update (buf = grad,
        # dampening 0) whether or not the first step is skipped.
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
    return opt


class LossGuard:
    """Non-finite loss detection without a host sync per step: each step's verdict stays on the
    device (the first bad step and its loss); :meth:`check` reads it (and combines the processes)
    and raises :class:`TrainingError` naming the first bad step."""

    def __init__(self, device: torch.device, distributed: bool):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)
        self.distributed = distributed

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        new = (~torch.isfinite(loss)) & (self.first < 0)
        self.first = torch.where(new, torch.full_like(self.first, step), self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self, now: int, niter: int, schedule: np.ndarray, checkpoint: Path) -> None:
        first = self.first
        if self.distributed:  # the earliest bad step of any process; every process stops
            big = torch.iinfo(torch.int64).max
            first = torch.where(first < 0, torch.full_like(first, big), first).clone()
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == big, torch.full_like(first, -1), first)
        step = int(first.item())
        if step < 0:
            return
        value = float(self.value.item()) if int(self.first.item()) == step else float("nan")
        late = "" if step == now else f" (read {now - step} step(s) later)"
        kept = (f"The last good checkpoint is {checkpoint}" if checkpoint.is_file() else
                "No checkpoint was written yet")
        raise TrainingError(
            f"non-finite loss ({value}) at epoch {step // niter + 1}, iteration {step % niter}"
            f"{late} (lr {float(schedule[step]):.4g}); stopping. Lower --lr, check the data, or "
            f"use --amp none. {kept}")


def _compile_networks(module: TrainModule) -> None:
    """``torch.compile`` the online and EMA networks in place (``nn.Module.compile``): the
    parameters, buffers and ``state_dict`` keys stay those of the uncompiled module, so
    checkpoints, resume, EMA and DDP see no difference. Static shapes: training batches all
    have one size (``drop_last``); validation compiles its own graphs once."""
    if not hasattr(nn.Module, "compile"):
        raise TrainingError(f"--compile needs torch >= 2.2 (this is {torch.__version__}); "
                            "upgrade torch or drop --compile")
    module.model.compile(dynamic=False)
    module.model_ema.compile(dynamic=False)


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
                        num_workers=args.workers, pin_memory=env.device.type == "cuda",
                        **worker_kwargs(args, env.device))
    net = module.model
    was_training = net.training
    net.eval()
    protos = module.memory.prototypes() if module.memory is not None else None
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)
    fmt = torch.channels_last if _channels_last(args, env.device) else torch.preserve_format
    for images, labels in loader_batches(loader, "validation"):
        images = images.to(env.device, non_blocking=True, memory_format=fmt)
        labels = labels.to(env.device, non_blocking=True)
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
    """Run (or continue) a training; returns the last epoch's log record.

    Under torchrun a failure is raised as :func:`~.runtime.failure_in_group` decides: the
    run's first failure as it is (call :func:`~.runtime.failure_reported` once it is shown),
    :class:`~.runtime.FailedElsewhere` in the other processes."""
    try:
        env = setup_distributed(args.device)
    except TrainingError as exc:  # a missing device: alike in every process of the machine
        if reports_alike_errors():
            record_for_torchrun(str(exc))  # torchrun's summary then shows it
            raise
        linger()
        raise FailedElsewhere(str(exc)) from exc
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train(args, env)
    except Exception as exc:
        if not env.distributed:
            raise
        reported = failure_in_group(exc, env)
        if reported is exc:
            raise
        raise reported from exc
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, env: DistEnv) -> Dict[str, Any]:
    out_dir = Path(args.output_dir)
    refuse_earlier_run(args, out_dir)
    if env.is_main:  # writable? (before the data and the network are loaded)
        prepare_output_dir(out_dir)
    cuda = env.device.type == "cuda"
    if cuda and args.deterministic:  # cuBLAS needs this before its first handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = bool(args.deterministic)
        if args.deterministic:  # e.g. index_add_ (prototypes) takes its deterministic kernel
            torch.use_deterministic_algorithms(True, warn_only=True)

    aug_ahead = bool(getattr(args, "aug_ahead", False))
    if aug_ahead and resolve_aug(getattr(args, "aug", "cpu"), env.device) != "gpu":
        raise TrainingError("--aug-ahead needs the batched path: add --aug gpu (--aug auto "
                            "picks it on CUDA) or drop --aug-ahead")
    train_data, val_data = load_data(args)
    channels_last = _channels_last(args, env.device)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    data = build_train_loader(args, train_data, env.device, env.rank, env.world_size,
                              channels_last)
    train_ds = data.dataset
    niter = data.sampler.per_epoch
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
    if channels_last:  # 4-D weights in NHWC: cuDNN's fast convolutions, no layout copies
        module.to(env.device, memory_format=torch.channels_last)
    else:
        module.to(env.device)
    optimizer = build_optimizer(module, args, env.device)
    if getattr(args, "compile", False):
        _compile_networks(module)
    amp_mode, amp_dtype = _amp(args, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_mode == "fp16")

    saved_args = plain_namespace(
        args, lr_schedule=schedule, num_classes=int(num_classes),
        class_names=[str(c) for c in train_data.class_names], world_size=env.world_size,
        iters_per_epoch=int(niter), peak_lr=float(peak), projector_l2_norm=bool(
            args.projector_l2_norm and not args.no_projector))
    start_epoch = 0
    if args.resume:
        path = out_dir / CHECKPOINT_NAME if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            start_epoch = resume_from(path, module, optimizer, scaler, schedule, env,
                                      saved_args)
            _log(env, f"resumed from {path} after epoch {start_epoch}")
        elif args.resume == "auto":
            _log(env, f"--resume: no {path} yet, starting from scratch")
        else:
            raise TrainingError(f"--resume {path}: no such file")

    net: nn.Module = module
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[env.local_rank] if cuda else None)
        gather = all_gather_cat
    bn_note = ("SyncBatchNorm" if sync_bn else
               "per-process BatchNorm (SyncBatchNorm needs CUDA)" if env.distributed else
               "BatchNorm")
    check_every = _check_every(args, env.device)
    _log(env, f"{args.preset}: {args.arch}, {num_classes} classes, {len(train_ds)} images, "
              f"{env.world_size} process(es) x {args.batch_size} = batch {global_batch}, "
              f"{niter} it/epoch, peak lr {peak:.4g}, amp {amp_mode}, {bn_note}, "
              f"{env.device.type}, augmentation {data.mode}"
              f"{' (one batch ahead)' if aug_ahead else ''}"
              f"{', channels_last' if channels_last else ''}"
              f"{', torch.compile' if getattr(args, 'compile', False) else ''}")

    dump_dir = Path(args.debug_dump) if args.debug_dump else None
    if env.is_main:
        _start_log(args, env, out_dir, start_epoch)
    guard = LossGuard(env.device, env.distributed)
    last_good = out_dir / CHECKPOINT_NAME
    saved = start_epoch if start_epoch and last_good.is_file() else None  # the kept epoch
    record: Dict[str, Any] = {}
    epochs = data.epochs(start_epoch, args.epochs)  # one loader iterator for every epoch
    for epoch, epoch_batches in zip(range(start_epoch, args.epochs), epochs):
        train_ds.set_epoch(epoch)
        net.train()
        meters = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
        t0 = time.time()
        batches = device_batches(epoch_batches, data, env.device, fmt, ahead=aug_ahead)
        for it, (images, labels) in enumerate(batches):
            if it == 0:
                t_batch = time.time()
            step = epoch * niter + it
            lr = float(schedule[step])
            for group in optimizer.param_groups:
                group["lr"] = lr
            before = _dump_before(module, env) if dump_dir else None
            with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss, logits, targets = net(images, labels, gather)
            guard.observe(loss, step)
            if check_every == 1:  # before the step, as the message promises on CPU
                guard.check(step, niter, schedule, last_good)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            module.update_ema(args.ema_momentum)
            n_glob = labels.shape[0] * args.global_crops
            meters[0] += loss.detach().double()
            meters[1] += (logits[:n_glob].argmax(-1) == targets[:n_glob]).sum()
            meters[2] += n_glob
            if check_every > 1 and ((it + 1) % check_every == 0 or it == niter - 1):
                guard.check(step, niter, schedule, last_good)
            if dump_dir is not None:
                _dump_step(dump_dir, step, images, labels, before, module, env, args)
            if args.print_freq and (it % args.print_freq == 0 or it == niter - 1):
                line = (f"epoch {epoch + 1}/{args.epochs} [{it + 1}/{niter}] "
                        f"loss {loss.item():.4f} lr {lr:.4g}")  # .item(): the step is done
                if epoch == start_epoch and it == 0:  # loader start-up, cuDNN's autotuning
                    line += (f" (first batch after {t_batch - t0:.1f} s, first step "
                             f"{time.time() - t_batch:.1f} s)")
                _log(env, line)
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
        if env.is_main:  # before the checkpoint: a resume drops a record the checkpoint lacks
            append_log(out_dir, record, saved)
        if last or stopping or keep or (epoch + 1) % every == 0:
            states = all_gather_objects(rng_state(env.device), env)
            if env.is_main:
                obj = checkpoint_dict(module, optimizer, scaler, epoch + 1, saved_args, states)
                write_checkpoint(obj, last_good, saved)
                saved = epoch + 1
                if keep:
                    write_checkpoint(obj, out_dir / f"checkpoint{epoch + 1:04d}.pth", saved)
                del obj
        if env.is_main:
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


def _start_log(args: argparse.Namespace, env: DistEnv, out_dir: Path, start_epoch: int) -> None:
    """Before the first epoch (main process): ``--overwrite`` clears the earlier run, so late
    that a run failing at its start (data, options) leaves it in place; a resumed run keeps
    the log's records up to its checkpoint (``trim_log``)."""
    if getattr(args, "overwrite", False):
        clear_earlier_run(out_dir)
    elif args.resume:
        dropped = trim_log(out_dir / LOG_NAME, start_epoch)
        if dropped:
            _log(env, f"{LOG_NAME}: dropped {dropped} line(s) after epoch {start_epoch}, the "
                      "checkpoint's (those epochs run again)")


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
           "rng_state", "set_rng_state", "all_gather_cat", "LossGuard", "CHECKPOINT_NAME",
           "LOG_NAME", "build_optimizer", "trim_log", "earlier_run"]

"""The plumbing every script shares: caches and atomic writes, one code path for one process and
torchrun (nanoGPT style), the gradient step with its non-finite guard, the learning-rate schedule
and the metrics log. Nothing here knows the paper; the scripts read as the paper with this below.

    cache_dir, atomic_write, atomic_pickle            where caches live; files written whole or not at all
    setup_distributed, rank_and_world                 DDP from torchrun's RANK (nccl on CUDA, gloo on CPU)
    interleave, gather_shards                         a sharded evaluation put back in order
    all_reduce_sum, on_every_rank, broadcast_from_master, sync_gradients, apply_gradients
    cosine_lr                                         Table 4's schedule: linear warm-up, cosine decay
    make_logger, gpu_peak                             metrics.jsonl and the GPU memory chart
    use_gradient_checkpointing                        --gradient_checkpointing auto|yes|no
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import threading
import time
from typing import Tuple

import torch


def cache_dir() -> str:
    """Root of this project's caches: $POSE_RFT_CACHE, else ~/.cache/pose_rft."""
    return os.environ.get("POSE_RFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pose_rft")


def atomic_write(path: str, write, binary: bool = False) -> None:
    """Write a file so that a reader sees the old file or the whole new one, never a part.

    `write(fh)` fills an open temporary file in path's folder (named for this process and thread,
    made with the usual mode under the umask), which then replaces path by `os.replace`. On any
    error the temporary file is removed and path is left as it was. The project's caches, results,
    markers and LATEST files are all written through this.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_pickle(obj, path: str) -> None:
    """Write a pickle atomically (atomic_write)."""
    atomic_write(path, lambda fh: pickle.dump(obj, fh, protocol=4), binary=True)


def setup_distributed():
    """Returns (ddp, rank, world, device). torchrun sets RANK; nccl on CUDA, gloo on CPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if backend == "nccl" and local_rank >= gpus:
            raise SystemExit(f"torchrun started local rank {local_rank} but this node has {gpus} GPU(s): pass "
                             f"--nproc_per_node={gpus} (one process per GPU), or CUDA_VISIBLE_DEVICES= to run on "
                             "CPU (gloo)")
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return True, rank, world, device
    return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def interleave(shards: list):
    """Inverse of sharding `shard_r = items[r::W]`: W shards (lists, or tensors with rows) -> the items in order."""
    W, n = len(shards), sum(len(s) for s in shards)
    if torch.is_tensor(shards[0]):
        out = shards[0].new_empty((n, *shards[0].shape[1:]))
    else:
        out = [None] * n
    for r, s in enumerate(shards):
        out[r::W] = s
    return out


def gather_shards(local, world: int):
    """All ranks' shards (`items[rank::world]`, a list or a CPU tensor), gathered and put back in order."""
    if world == 1:
        return local
    import torch.distributed as dist
    shards = [None] * world
    dist.all_gather_object(shards, local)
    return interleave(shards)


def all_reduce_sum(t: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def on_every_rank(ok: bool, ddp: bool, device) -> bool:
    """Whether ok holds on every rank (itself without DDP). A step is skipped by all ranks or by none:
    a rank that skipped alone would leave the others waiting in the gradient all-reduce."""
    if not ddp:
        return ok
    return all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=device), ddp).item() == 0


def broadcast_from_master(tensors, ddp: bool) -> None:
    """Copies rank 0's values of these tensors (e.g. a module's parameters) to every rank, in place."""
    if ddp:
        import torch.distributed as dist
        for t in tensors:
            dist.broadcast(t.data, src=0)


def sync_gradients(params, ddp: bool, average: bool = False):
    """Sum (or average) gradients over ranks. SFT sums: its losses are normalised by global counts,
    so the sum is the gradient of the global-batch loss, exactly as in one process. RFT averages:
    each rank's loss is a mean over its own whole groups."""
    if not ddp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, ddp)
    if average:
        import torch.distributed as dist
        flat /= dist.get_world_size()
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(g).clone()
        i += n


def apply_gradients(opt, params, grad_clip: float, ddp: bool, device, average: bool = False):
    """Sync (sync_gradients), clip and apply the gradients of one backward: returns (what was not finite,
    None if nothing, and the gradient norm). A NaN/inf gradient norm on any rank skips the step on every
    rank ("gradient": weights and optimizer state unchanged). "weight": the step left a NaN/inf weight,
    which cannot be undone; the caller stops the run (count_bad_step) before anything saves it."""
    sync_gradients(params, ddp, average)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not on_every_rank(bool(torch.isfinite(gnorm)), ddp, device):
        opt.zero_grad(set_to_none=True)
        return "gradient", gnorm
    opt.step()
    finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    return (None if on_every_rank(finite, ddp, device) else "weight"), gnorm


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def make_logger(out_dir: str, master: bool):
    """log(metrics, step): one JSON object per call, printed and appended to out_dir/metrics.jsonl
    (rank 0 only)."""
    t_start = time.time()

    def log(d, step=None):
        if master:
            rec = {"step": step, "time_s": round(time.time() - t_start, 1), **d}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    return log


def gpu_peak(device: torch.device) -> dict:
    """The peak GPU memory this process has allocated so far, as a metric (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"charts/gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}


def use_gradient_checkpointing(args) -> bool:
    return args.gradient_checkpointing == "yes" or (args.gradient_checkpointing == "auto"
                                                     and args.preset == "llava-1.5-7b")

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
import dataclasses
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


def check_batch(batch_size: int, world: int, grad_accum: int, what: str = "--batch_size") -> None:
    """Stop unless the global batch splits evenly over the processes and the micro-batches."""
    if batch_size % (world * grad_accum):
        raise SystemExit(f"{what} {batch_size} must be divisible by the number of processes ({world}) x --grad_accum "
                         f"({grad_accum}) = {world * grad_accum}: pass a --batch_size or --grad_accum that divides")


class StepBatches(torch.utils.data.Sampler):
    """The dataset indices this rank reads for steps start..steps-1, as grad_accum micro-batches a step.
    A step's global batch depends on (seed, step) alone: batch_size indices drawn with replacement,
    rank r taking every world-th from r on, cut into grad_accum consecutive micro-batches. So resuming
    at any step replays the uninterrupted run, and the micro-batches of a step together are exactly
    the one batch of grad_accum = 1."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1,
                 grad_accum: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.steps = n, batch_size, seed, start, steps
        self.rank, self.world, self.grad_accum = rank, world, grad_accum

    def __len__(self) -> int:
        return (self.steps - self.start) * self.grad_accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randint(self.n, (self.batch_size,), generator=g)[self.rank::self.world].tolist()
            m = len(idx) // self.grad_accum
            for k in range(self.grad_accum):
                yield idx[k * m:(k + 1) * m]


def step_loader(tasks, args, start: int, rank: int, world: int, seed: int):
    """An iterator over this rank's micro-batches (lists of samples) for steps start..args.steps-1, read by
    torch's DataLoader with args.num_workers processes (StepBatches' indices: every sample is a function of
    its index, so the workers change nothing but the time). Its own generator: the loader draws no number
    from the global random streams, which the training step's sampling uses."""
    sampler = StepBatches(len(tasks), args.batch_size, seed, start, args.steps, rank, world, args.grad_accum)
    loader = torch.utils.data.DataLoader(tasks, batch_sampler=sampler, collate_fn=list, num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         prefetch_factor=2 if args.num_workers else None)
    return iter(loader)


# --report_to: its package
REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(value: str, script: str) -> None:
    """Stop before any work unless --report_to names a known tracker whose package is installed."""
    if value not in REPORT_TO:
        raise SystemExit(f"{script}: --report_to {value}: expected one of {', '.join(REPORT_TO)}")
    package = REPORT_TO[value]
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"{script}: --report_to {value} needs the {package} package, which is not installed: "
                             f"pip install {package} (an optional install, not in requirements.txt), or drop the flag")


def make_tracker(report_to: str, out_dir: str, args=None):
    """(log(scalars, step), close()) of --report_to's tracker; None for none. TensorBoard writes to
    out_dir/tensorboard; W&B and trackio log to project pose-rft, run named after out_dir, the flags as its
    config (a resumed run goes on in the run its first start made, by the id kept in out_dir)."""
    if report_to == "none":
        return None
    config = dataclasses.asdict(args) if args is not None else {}
    name = os.path.basename(os.path.abspath(out_dir))
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

        def log(scalars, step):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return log, writer.close
    id_file = os.path.join(out_dir, f"{report_to}_run_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else f"{name}-{int(time.time())}"
    atomic_write(id_file, lambda fh: fh.write(run_id))
    if report_to == "wandb":
        import wandb

        run = wandb.init(project="pose-rft", name=name, id=run_id, resume="allow", dir=out_dir, config=config)
        return (lambda scalars, step: run.log(scalars, step=step)), run.finish
    import trackio

    trackio.init(project="pose-rft", name=run_id, config=config, resume="allow")
    return (lambda scalars, step: trackio.log(scalars, step=step)), trackio.finish


def make_logger(out_dir: str, master: bool, report_to: str = "none", args=None):
    """log(metrics, step): one JSON object per call, printed and appended to out_dir/metrics.jsonl
    (rank 0 only), and its numbers sent to --report_to's tracker (make_tracker; records without a
    step, such as stage 0's, at step 0). log.close() closes the tracker."""
    t_start = time.time()
    tracker = make_tracker(report_to, out_dir, args) if master else None

    def log(d, step=None):
        if master:
            rec = {"step": step, "time_s": round(time.time() - t_start, 1), **d}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            scalars = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if tracker and scalars:
                tracker[0](scalars, step or 0)

    log.close = tracker[1] if tracker else (lambda: None)
    return log


def gpu_peak(device: torch.device) -> dict:
    """The peak GPU memory this process has allocated so far, as a metric (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"charts/gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}


def use_gradient_checkpointing(args) -> bool:
    return args.gradient_checkpointing == "yes" or (args.gradient_checkpointing == "auto"
                                                    and args.preset == "llava-1.5-7b")

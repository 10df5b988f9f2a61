"""Checkpoints and resuming, shared by train_sft.py and train_rft.py.

A run directory (`--out_dir`) holds base/ (the frozen starting weights), step-NNNNNN/ (adapter/ and
train_state.pt: optimizer, every rank's random states, the step, the flags) and LATEST, the name of
the newest complete step directory. A step directory is written under a temporary name and renamed
into place, and LATEST is rewritten atomically afterwards, so an interrupted save never leaves a
LATEST that points at a partial checkpoint. `--resume` restores the optimizer and each rank's random
streams, so the resumed run is the uninterrupted one (tests/test_train_sft.py, test_train_rft.py).
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil

import numpy as np
import torch

import body


def trainable_params(policy, state=None):
    """(names, params) of the trainable parameters, in the order of `state`'s optimizer when
    resuming: a reloaded peft model may list its parameters in another order, and the optimizer
    state is matched by position (two same-shaped token rows would silently swap moments)."""
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    names = list(named) if state is None else state["param_names"]
    if set(names) != set(named):
        raise SystemExit(f"the checkpoint's trainable parameters differ from the model's: "
                         f"{sorted(set(names) ^ set(named))[:5]}")
    return names, [named[n] for n in names]


def prepare_out_dir(out_dir: str, resume: bool, master: bool) -> None:
    """--resume needs a checkpoint in out_dir. A new run refuses a directory that holds one (the two
    runs' checkpoints and metrics would mix), creates it, and moves aside the metrics.jsonl of an
    earlier run that saved no checkpoint (to metrics.jsonl.1, .2, ...) instead of appending to it."""
    latest = os.path.join(out_dir, "LATEST")
    if resume:
        if not os.path.exists(latest):
            raise SystemExit(f"--resume: {out_dir} has no checkpoint to resume from (no LATEST file); drop --resume "
                             "to start a new run there, or pass the --out_dir of the run to continue")
        return
    if os.path.exists(latest):
        with open(latest) as fh:
            raise SystemExit(f"{out_dir} holds a run (checkpoint {fh.read().strip()}): pass --resume to continue it, "
                             "or another --out_dir (or delete this one) for a new run")
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if master and os.path.exists(metrics):
        n = 1
        while os.path.exists(f"{metrics}.{n}"):
            n += 1
        os.replace(metrics, f"{metrics}.{n}")
        print(f"{metrics} was the log of an earlier run that saved no checkpoint: moved to {metrics}.{n}")


def changed_flags(saved: dict, args) -> list:
    """['--name value (was saved)'] for each flag whose value differs from the checkpoint's run
    (--resume and --stop_after excepted): a resumed run with other values is not the one it continues."""
    return [f"--{k} {v} (was {saved[k]})" for k, v in dataclasses.asdict(args).items()
            if k in saved and saved[k] != v and k not in ("resume", "stop_after")]


def restore_train_state(opt, state, args, rank: int = 0, world: int = 1) -> int:
    """Load the optimizer and this rank's RNG states of a checkpoint (save_checkpoint); return its step.
    Rank 0 says which flags differ from the run being continued (changed_flags). A checkpoint saved by
    another number of processes keeps the fresh seeds (said by rank 0 too): the run goes on, but not as
    the uninterrupted one would have."""
    opt.load_state_dict(state["optimizer"])
    changed = changed_flags(state["args"], args)
    if rank == 0 and changed:
        print("resume: flags that differ from the run being continued: " + ", ".join(changed))
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict: one process's
    if len(rngs) != world:
        if rank == 0:
            print(f"resume: the checkpoint holds the random states of {len(rngs)} process(es) and this run has "
                  f"{world}; each process keeps its fresh seed, so the rest of the run is not the one an "
                  "uninterrupted run would give")
        return state["step"]
    rng = rngs[rank]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def rng_state() -> dict:
    """This process's random states: torch's (and CUDA's, once in use), numpy's and python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rank_rng_states(ddp: bool) -> list:
    """Every rank's rng_state(), in rank order: each rank samples with its own stream, and a resumed
    run must give each its own back. Under DDP a collective: every rank calls it."""
    if not ddp:
        return [rng_state()]
    import torch.distributed as dist
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(out_dir, step, policy, opt, args, param_names, ddp: bool = False, master: bool = True):
    """Adapter (LoRA, projectors, pose head, new token rows) + optimizer + every rank's RNG states +
    step, in a temporary directory renamed into place; LATEST is rewritten atomically afterwards.
    Under DDP a collective (every rank calls it: the RNG states are gathered); rank 0 writes."""
    rng = rank_rng_states(ddp)
    if not master:
        return None
    final = os.path.join(out_dir, f"step-{step:06d}")
    tmp = os.path.join(out_dir, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"step": step, "optimizer": opt.state_dict(), "param_names": param_names, "args": dataclasses.asdict(args),
                "rng": rng}, os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    body.atomic_write(os.path.join(out_dir, "LATEST"), lambda fh: fh.write(os.path.basename(final)))
    return final

"""Checkpoints and resuming, shared by train_sft.py and train_rft.py.

A run directory (`--out_dir`) holds base/ (the frozen starting weights), step-NNNNNN/ (adapter/ and
train_state.pt: optimizer, every rank's random states, the step, the flags) and LATEST, the name of
the newest complete step directory. A step directory is written under a temporary name and renamed
into place, and LATEST is rewritten atomically afterwards, so an interrupted save never leaves a
LATEST that points at a partial checkpoint. `--resume` restores the optimizer and each rank's random
streams, so the resumed run is the uninterrupted one (tests/test_train_sft.py, test_train_rft.py).

Nothing lost, nothing silent (docs/TRAINING.md, "Reliability"): the flags and the out-directory are checked before
a run does any work (`check_flags`, `check_writable`); a checkpoint holding a NaN/inf is never written,
a full disk stops the save naming the path (`save_checkpoint`); a LATEST, a step, a base/ or a file that
is truncated, missing or garbage is named with its fix (`run_step`, `load_train_state`), and `--resume`
over a damaged latest step goes on from the previous intact one, saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import socket
import struct
import threading
import zipfile

import numpy as np
import torch

import data
import plumbing


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


STEP_NAME = re.compile(r"step-\d{6}")  # a step directory's name, as save_checkpoint writes it


def check_flags(args, script: str, at_least: dict, positive=()) -> None:
    """Stop before any work, naming every flag that cannot run: a float (or a list's) that is NaN/inf, a
    flag of `positive` that is not > 0, a flag of `at_least` ({name: minimum}) below its minimum."""
    problems = []
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
            problems.append(f"--{f.name} {v}: not a finite number")
        elif f.name in positive and not v > 0:
            problems.append(f"--{f.name} {v}: must be > 0")
        elif f.name in at_least and v < at_least[f.name]:
            problems.append(f"--{f.name} {v}: must be >= {at_least[f.name]}")
    if problems:
        raise SystemExit(f"{script}: flags that cannot run (nothing was done):\n  " + "\n  ".join(problems))


def check_writable(path: str, flag: str = "--out_dir") -> None:
    """Stop at once unless the directory `path` can be created and written: an unwritable output must fail
    before the work whose results it would hold. Leaves the file system as it was (the probe file and the
    directories made for it are removed again). Every rank of a torchrun job may check the same path at
    once: a directory another rank removes under this one is made again (CI once failed on that race)."""
    probe = os.path.join(path, f".write-test.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
    made, d = [], os.path.abspath(path)
    while not os.path.exists(d) and d != os.path.dirname(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        for attempt in range(10):
            try:
                os.makedirs(path, exist_ok=True)
                with open(probe, "w") as fh:
                    fh.write("ok")
                os.remove(probe)
                break
            except (FileNotFoundError, FileExistsError):  # another rank removed a directory it made for its probe
                if attempt == 9:
                    raise
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot write there ({e.strerror or e}); pass a writable directory "
                         "(nothing was done)") from None
    finally:
        for d in made:  # deepest first; a directory another rank is probing is not empty and stays
            with contextlib.suppress(OSError):
                os.rmdir(d)


def json_problems(path: str) -> list:
    """[] if path is a readable JSON file, else what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            json.loads(fh.read())
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, ValueError) as e:
        return [f"{path} is not valid JSON ({type(e).__name__}: truncated or corrupt)"]
    return []


def safetensors_problems(path: str) -> list:
    """[] if path is a whole safetensors file (its header reads and the file holds every byte the header
    declares), else what is wrong with it. Reads the header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return [f"{path} is not a safetensors file (its header does not read: truncated or corrupt)"]
    return [f"{path} is truncated ({size} of its {need} bytes)"] if size < need else []


def torch_file_problems(path: str) -> list:
    """[] if path is a whole torch.save archive (its zip directory reads), else what is wrong with it."""
    try:
        zipfile.ZipFile(path).close()
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, zipfile.BadZipFile):
        return [f"{path} is not a torch checkpoint (truncated or corrupt)"]
    return []


def base_problems(base_dir: str) -> list:
    """What is missing, truncated or corrupt in a base/ directory (presets.save_base's layout); [] if whole."""
    model = os.path.join(base_dir, "model")
    problems = [p for f in (os.path.join(base_dir, "preset.json"), os.path.join(model, "config.json"),
                            os.path.join(base_dir, "tokenizer", "tokenizer.json")) for p in json_problems(f)]
    index = os.path.join(model, "model.safetensors.index.json")
    if not os.path.exists(index):
        return problems + safetensors_problems(os.path.join(model, "model.safetensors"))
    if json_problems(index):
        return problems + json_problems(index)
    with open(index) as fh:
        shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
    return problems + [p for s in shards for p in safetensors_problems(os.path.join(model, s))]


def step_problems(step_dir: str, train_state: bool = True) -> list:
    """What is missing, truncated or corrupt in a step directory (the adapter, and train_state.pt)."""
    adapter = os.path.join(step_dir, "adapter")
    problems = json_problems(os.path.join(adapter, "adapter_config.json"))
    problems += safetensors_problems(os.path.join(adapter, "adapter_model.safetensors"))
    return problems + (torch_file_problems(os.path.join(step_dir, "train_state.pt")) if train_state else [])


def run_step(run_dir: str, flag: str, resume: bool = False) -> str:
    """The step directory of a run to load, its files checked first (base/, LATEST and its step: adapter, and
    train_state.pt for --resume). Stops naming each damaged file and the fix. Resuming over a damaged
    latest step (or a LATEST that names none) goes on from the newest intact step before it, saying so."""
    link = os.path.join(run_dir, "base")
    # an RFT run: base/ links to its SFT run's (presets.write_rft_start)
    if os.path.islink(link) and not os.path.isdir(link):
        raise SystemExit(f"{flag} {run_dir}: its base/ links to {os.readlink(link)}, which is gone: the SFT run this "
                         f"run started from must stay where it was, or link base/ to where it is now "
                         f"(ln -sfn NEW_SFT_DIR/base {link})")
    if not os.path.isdir(os.path.join(run_dir, "base")):
        what = "no such directory" if not os.path.isdir(run_dir) else "no base/ in it"
        raise SystemExit(f"{flag} {run_dir}: {what}; point it at a run of train_sft.py or train_rft.py (its --out_dir)")
    base = base_problems(os.path.join(run_dir, "base"))
    if base:
        raise SystemExit(f"{flag} {run_dir}: its base model is damaged: {'; '.join(base)}. Restore base/ from a copy, "
                         "or start a new run in another directory")
    latest = os.path.join(run_dir, "LATEST")
    try:
        with open(latest, encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        raise SystemExit(f"{flag} {run_dir}: no checkpoint (no LATEST file); point it at a finished run of "
                         "train_sft.py or train_rft.py") from None
    except (OSError, UnicodeDecodeError):
        name = "(unreadable bytes)"
    if STEP_NAME.fullmatch(name):
        why = step_problems(os.path.join(run_dir, name), resume)
        if not why:
            return os.path.join(run_dir, name)
        what = f"its latest checkpoint {name} is damaged: {'; '.join(why)}"
    else:
        what = f"{latest} holds {name[:40]!r}, not the name of a step directory such as step-000100"
    before = lambda d: d < name or not STEP_NAME.fullmatch(name)  # noqa: E731 - older than the damaged step
    steps = sorted((d for d in os.listdir(run_dir) if STEP_NAME.fullmatch(d) and before(d)), reverse=True)
    earlier = next((d for d in steps if not step_problems(os.path.join(run_dir, d), resume)), None)
    if resume and earlier:
        print(f"resume: {what}; resuming from {earlier}, the newest intact checkpoint before it")
        return os.path.join(run_dir, earlier)
    fix = (f"the newest intact one is {earlier}: write that name into {latest} to use it" if earlier else
           "no intact checkpoint is left: start a new run")
    raise SystemExit(f"{flag} {run_dir}: {what}; {fix}")


def load_train_state(step_dir: str, map_location=None) -> dict:
    """A step directory's train_state.pt; SystemExit naming the file if it does not load."""
    path = os.path.join(step_dir, "train_state.pt")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch reports a damaged archive as RuntimeError, EOFError, UnpicklingError, ...
        raise SystemExit(f"{path} does not load ({type(e).__name__}: {str(e)[:200]}): truncated or corrupt; resume "
                         "from an earlier step (write its name into the run's LATEST) or start a new run") from None


def last_good(out_dir: str) -> str:
    """Where a stopped run can go on from, for messages: LATEST's checkpoint, or that there is none."""
    try:
        with open(os.path.join(out_dir, "LATEST"), encoding="utf-8") as fh:
            name = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return f"{out_dir} holds no checkpoint of this run"
    return f"the last good checkpoint is {os.path.join(out_dir, name)} (LATEST; --resume goes on from it)"


def prune_checkpoints(out_dir: str, keep: int, latest: str) -> list:
    """Remove all but the newest `keep` step directories of a run (0: keep every one), never `latest`
    (the step LATEST names, just written). Returns the names removed. Runs after a new step and LATEST
    are complete, so a crash in between leaves one more checkpoint, never one fewer."""
    if keep <= 0:
        return []
    steps = sorted(n for n in os.listdir(out_dir) if re.fullmatch(r"step-\d{6,}", n) and
                   os.path.isdir(os.path.join(out_dir, n)))
    old = [n for n in steps[:-keep] if n != latest]
    for name in old:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return old


def nonfinite_entries(opt, param_names) -> list:
    """The trainable parameters (and their optimizer state) holding a NaN/inf, by name: what a checkpoint
    would save of them. `param_names` names opt's parameters in order."""
    params = [p for g in opt.param_groups for p in g["params"]]
    bad = []
    for name, p in zip(param_names, params):
        tensors = [(name, p)] + [(f"{name} (optimizer {k})", t) for k, t in opt.state.get(p, {}).items()
                                 if torch.is_tensor(t) and t.is_floating_point()]
        bad += [n for n, t in tensors if not bool(torch.isfinite(t).all())]
    return bad


def _no_space(err: BaseException, folder: str) -> bool:
    """Whether err (or an error that led to it) is a full disk or quota, or the disk of folder is full now
    (torch's writer reports a full disk as a RuntimeError about positions)."""
    e = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


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
        with open(latest, errors="replace") as fh:
            raise SystemExit(f"{out_dir} holds a run (checkpoint {fh.read().strip()[:40]}): pass --resume to continue "
                             "it, or another --out_dir (or delete this one) for a new run")
    check_writable(out_dir)
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
    if state["step"] > args.steps:
        raise SystemExit(f"--resume: the checkpoint is at step {state['step']}, past --steps {args.steps}: nothing "
                         f"would run and the results would be named step {args.steps}; pass --steps {state['step']} "
                         f"or more (the run was started with --steps {state['args'].get('steps')})")
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
    Under DDP a collective (every rank calls it: the RNG states are gathered); rank 0 writes.

    Refuses (SystemExit, nothing written) weights or optimizer state holding a NaN/inf, naming them and
    the last good checkpoint; a full disk stops the run naming the path, the partial step removed."""
    bad = nonfinite_entries(opt, param_names)  # every rank holds the same weights: all refuse, before the collective
    if bad:
        raise SystemExit(f"refusing to save step {step}: NaN/inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
                         f"{last_good(out_dir)}. Lower --lr (now {args.lr}) and resume from there, or start again")
    rng = rank_rng_states(ddp)
    if not master:
        return None
    final = os.path.join(out_dir, f"step-{step:06d}")
    tmp = os.path.join(out_dir, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy.save_pretrained(os.path.join(tmp, "adapter"), selected_adapters=["default"])  # (RFT: not its reference)
        torch.save({"step": step, "optimizer": opt.state_dict(), "param_names": param_names,
                    "args": dataclasses.asdict(args), "rng": rng}, os.path.join(tmp, "train_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        plumbing.atomic_write(os.path.join(out_dir, "LATEST"), lambda fh: fh.write(os.path.basename(final)))
        prune_checkpoints(out_dir, getattr(args, "keep_checkpoints", 0), os.path.basename(final))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _no_space(e, out_dir):
            raise
        where = getattr(e, "filename", None) or final
        raise SystemExit(f"no space left on the device of {out_dir} while writing {where} ({e}); step {step} was not "
                         f"saved, {last_good(out_dir)}. Free space there and rerun with --resume") from None
    return final


# ---- the training scripts' shared checks -----------------------------------------------------

def count_bad_step(bad: int, what: str | None, done: int, args, log) -> int:
    """The count of consecutive skipped steps after step `done` (0 after a good one; `what` was not finite:
    loss, gradient, reward or weight), logged as skipped/nonfinite_{what}. Stops the run after
    --max_bad_steps of them, or at once for a weight, naming the last good checkpoint."""
    if what is None:
        return 0
    bad += 1
    log({f"skipped/nonfinite_{what}": bad}, done)
    if what == "weight" or bad >= args.max_bad_steps:
        why = ("its update left NaN/inf weights, which cannot be undone" if what == "weight" else
               f"{bad} consecutive steps with NaN/inf {what}s")
        raise SystemExit(f"aborting: {why} (step {done}); no checkpoint holds them, "
                         f"{last_good(args.out_dir)}. A diverging run: lower --lr (now {args.lr})")
    return bad


# flags every training script needs >= a minimum or > 0 (check_flags; a script adds its own)
AT_LEAST = dict(steps=1, batch_size=1, threads=1, log_every=1, save_every=1, max_bad_steps=1, seed=0, n_train=1,
                keep_checkpoints=0, grad_accum=1, num_workers=0,
                n_val=1, n_test=1, warmup_steps=0, lora_rank=1, lora_alpha=1, eval_samples=0, eval_generate=0,
                stop_after=0, max_length=0, weight_decay=0.0)


POSITIVE = ("lr", "grad_clip")


def check_args(args, script: str, at_least: dict, positive=POSITIVE) -> None:
    """Stop before any work or write, naming every flag that cannot run (check_flags) and the
    inputs read only later: --mix, --real_mix, --smpl_path."""
    check_flags(args, script, at_least, positive)
    plumbing.check_report_to(getattr(args, "report_to", "none"), script)
    w = np.asarray(args.mix, dtype=np.float64)
    if len(w) not in (len(data.TASKS), len(data.ALL_TASKS), len(data.MIX_TASKS)) or (w < 0).any() or w.sum() <= 0:
        raise SystemExit(f"{script}: --mix {' '.join(map(str, args.mix))}: expected {len(data.TASKS)} non-negative "
                         f"weights, not all zero ({', '.join(data.TASKS)}), or {len(data.ALL_TASKS)} with the "
                         f"pose-input tasks ({', '.join(data.POSE_INPUT_TASKS)}), or {len(data.MIX_TASKS)} with "
                         f"{data.ABSTRACT_TASK} too")
    if len(args.real_mix) not in (4, 6) or min(args.real_mix) < 0 or sum(args.real_mix) <= 0:
        raise SystemExit(f"{script}: --real_mix {' '.join(map(str, args.real_mix))}: expected 4 non-negative weights, "
                         "not all zero (text-to-pose, image-to-pose, image-text, VQA), or 6 with the pose-input tasks "
                         "(pose-to-text, pose editing)")
    if args.smpl_path and not os.path.isfile(args.smpl_path):
        raise SystemExit(f"{script}: --smpl_path {args.smpl_path}: not found; the licensed SMPL model file comes from "
                         "https://smpl.is.tue.mpg.de (SMPL for Python), or leave it out for the procedural body")


def trained_args(step_dir: str) -> dict:
    """The training script's arguments saved with a checkpoint ({} when there are none)."""
    if not os.path.isfile(os.path.join(step_dir, "train_state.pt")):
        return {}
    return load_train_state(step_dir, map_location="cpu").get("args", {})

"""Bad inputs and faults, tried against the scripts the way a new user meets them (docs/TRAINING.md, "Reliability").

Builds tiny assets once in a temporary directory (a 48/16/40-pose benchmark, a 4-step SFT run with
checkpoints at steps 2 and 4, two tiny retrievers, files in the real datasets' schemas), then runs
each try: a script's command line (`python SCRIPT FLAGS`, run in this process with runpy, so that each
try costs its work and not the imports), on a damaged copy of the assets where the try needs one.
Each outcome is sorted into one of:

    clear error      the script stopped (exit status != 0) without a traceback, saying what the try
                     expects it to say (the flag, file or record, and the fix)
    handled          the script ran through (exit 0), said what the try expects (e.g. "resuming from
                     step-000002", a warning that a caption was cut) and the try's check of its files holds
    unclear error    it stopped without a traceback, but without saying what the try expects
    traceback        a Python traceback
    silent or lossy  exit 0 where the input should have stopped it, or a check of its files that fails
                     (a checkpoint holding a NaN, work thrown away, a damaged step resumed from)

Prints one line per try, then the table. About five minutes on two CPU cores.

    python tools/reliability.py                 # every try
    python tools/reliability.py --only resume   # the tries whose name holds "resume"
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts it tries
BENCH = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]
SFT = BENCH + ["--stage0_pose_epochs", "1", "--stage0_clip_epochs", "1", "--stage0_lm_steps", "3", "--stage0_batch",
               "16", "--batch_size", "8", "--steps", "4", "--warmup_steps", "1", "--log_every", "2",
               "--save_every", "2",
               "--eval_samples", "8", "--eval_generate", "2", "--head_fit_steps", "10", "--head_fit_samples", "16",
               "--threads", "1"]
RFT = BENCH + ["--steps", "2", "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "8", "--log_every", "1",
               "--eval_samples", "0", "--threads", "1", "--warmup_steps", "1"]
RETRIEVAL = BENCH + ["--epochs", "1", "--embed_dim", "16", "--hidden_dim", "32", "--batch_size", "16",
                     "--num_threads", "1"]
OUTCOMES = ("clear error", "handled", "unclear error", "traceback", "silent or lossy")


@dataclass
class Try:
    """One bad input: its command line, what the script must say, and whether it must stop."""
    name: str
    argv: list                 # [script, *flags]
    says: tuple                # texts the script's output must hold
    stops: bool = True         # the input must stop the script; False: it must run through
    check: Callable | None = None  # a check of the files afterwards (True: as they should be)
    setup: Callable | None = None  # damages a copy of the assets before the run
    patch: Callable | None = None  # a context manager around the run (e.g. a full disk)


def run_script(argv: list) -> tuple[int, str]:
    """`python SCRIPT FLAGS` in this process: (exit status, stdout + stderr, with a traceback if one)."""
    out = io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [os.path.join(ROOT, argv[0]), *argv[1:]]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            os.chdir(ROOT)
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
    return code, out.getvalue()


def outcome(t: Try, code: int, text: str) -> str:
    if "Traceback (most recent call last)" in text:
        return "traceback"
    said = all(s in text for s in t.says)
    files_ok = t.check() if t.check else True
    if t.stops:
        if code == 0 or not files_ok:
            return "silent or lossy"
        return "clear error" if said else "unclear error"
    if code != 0:
        return "clear error" if said and files_ok else "unclear error"
    return "handled" if said and files_ok else "silent or lossy"


# ---- assets ---------------------------------------------------------------------------------

def build_assets(d: str) -> None:
    """The SFT run, the retrievers and the real-data fixtures every try starts from."""
    for argv in (["train_sft.py", *SFT, "--out_dir", f"{d}/sft"], ["retrieval.py", *RETRIEVAL, "--out_dir", d]):
        code, text = run_script(argv)
        if code:
            raise SystemExit(f"tools/reliability.py: building the assets failed ({argv[0]}):\n{text[-3000:]}")
    from PIL import Image

    import body
    rng = np.random.default_rng(0)
    os.makedirs(f"{d}/images")
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(f"{d}/images/img_{i}.png")
    kp3d = np.concatenate([rng.normal(0, 0.3, (4, 19, 3)), np.ones((4, 19, 1))], -1)
    np.savez(f"{d}/eval.npz", imgname=np.array([f"img_{i}.png" for i in range(4)]),
             center=np.tile([100.0, 80.0], (4, 1)),
             scale=np.full(4, 120.0), extra_keypoints_3d=kp3d)
    reg = rng.random((19, body.BodyModel().num_vertices))  # a J19 regressor of the procedural mesh
    np.save(f"{d}/J19.npy", reg / reg.sum(1, keepdims=True))
    os.makedirs(f"{d}/amass/CMU")
    np.savez(f"{d}/amass/CMU/a_poses.npz", poses=rng.normal(0, 0.3, (36, 156)))
    os.makedirs(f"{d}/posescript")
    with open(f"{d}/posescript/ids_2_dataset_sequence_and_frame_index_100k.json", "w") as fh:
        json.dump({str(i): ["AMASS", "CMU/a_poses.npz", i] for i in range(36)}, fh)
    with open(f"{d}/posescript/test_ids_100k.json", "w") as fh:
        json.dump(list(range(36)), fh)
    with open(f"{d}/posescript/posescript_human_6293.json", "w") as fh:
        json.dump({str(i): f"The left knee is bent {i} degrees." for i in range(36)}, fh)


def tries(d: str) -> list:
    """The bad inputs, each on its own copy of what it damages (under d/try-N)."""
    import body
    import checkpoint
    import torch
    from safetensors.torch import load_file

    sft, ret, ckpt = f"{d}/sft", ["--reward_retriever", f"{d}/retriever_reward", "--eval_retriever",
                                   f"{d}/retriever_eval"], "--ckpt"
    rft = ["train_rft.py", *RFT, "--sft_dir", sft, *ret]
    ev = ["evaluate.py", *BENCH, "--threads", "1", "--eval_samples", "4", "--eval_generate", "2", *ret]
    real = ["evaluate.py", ckpt, sft, "--threads", "1", "--batch_size", "4", "--joint_regressor", f"{d}/J19.npy",
            "--smpl_path", body.procedural_smpl_path()]
    n = iter(range(1000))

    def copy(what: str) -> str:  # a fresh copy of an asset, damaged by the try that asked for it
        dst = f"{d}/try-{next(n)}-{os.path.basename(what)}"
        (shutil.copytree if os.path.isdir(what) else shutil.copy)(what, dst)
        return dst

    def truncate(path: str, keep: float = 0.5) -> None:
        with open(path, "r+b") as fh:
            fh.truncate(int(os.path.getsize(path) * keep))

    def finite_latest(run: str) -> bool:  # LATEST names a step whose weights are all finite (or there is none)
        if not os.path.exists(f"{run}/LATEST"):
            return True
        with open(f"{run}/LATEST") as fh:
            step = fh.read().strip()
        weights = load_file(f"{run}/{step}/adapter/adapter_model.safetensors")
        return all(bool(torch.isfinite(t).all()) for t in weights.values())

    def latest_is(run: str, step: str) -> Callable:
        return lambda: open(f"{run}/LATEST").read() == step and not checkpoint.step_problems(f"{run}/{step}")

    @contextlib.contextmanager
    def full_disk():  # the disk fills while train_state.pt is written
        save = torch.save

        def full(obj, path, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        torch.save = full
        try:
            yield
        finally:
            torch.save = save

    out = lambda: f"{d}/out-{next(n)}"  # noqa: E731 - a fresh out_dir
    T = []
    # flags: every one checked before any work or write
    for script, base, flag, value, says in (
            ("train_sft.py", SFT, "batch_size", "0", "--batch_size 0: must be >= 1"),
            ("train_sft.py", SFT, "lr", "nan", "--lr nan: not a finite number"),
            ("train_sft.py", SFT, "lr", "-1", "--lr -1.0: must be > 0"),
            ("train_sft.py", SFT, "threads", "0", "--threads 0: must be >= 1"),
            ("train_sft.py", SFT, "steps", "-1", "--steps -1: must be >= 1"),
            ("train_sft.py", SFT, "warmup_steps", "-1", "--warmup_steps -1: must be >= 0"),
            ("train_sft.py", SFT, "log_every", "0", "--log_every 0: must be >= 1"),
            ("train_sft.py", SFT, "mix", "1 1", "--mix 1.0 1.0: expected 3 non-negative weights"),
            ("train_sft.py", SFT, "smpl_path", "nowhere.pkl", "--smpl_path nowhere.pkl: not found"),
            ("train_sft.py", SFT, "preset", "huge", "--preset huge"),
            ("train_rft.py", rft[1:], "steps", "-1", "--steps -1: must be >= 1"),
            ("train_rft.py", rft[1:], "batch_size", "0", "--batch_size 0: must be >= 1"),
            ("train_rft.py", rft[1:], "group_size", "1", "--group_size 1"),
            ("train_rft.py", rft[1:], "lr", "inf", "--lr inf: not a finite number"),
            ("train_rft.py", rft[1:], "pose_temperature", "0", "--pose_temperature 0.0: must be > 0"),
            ("evaluate.py", ev[1:] + [ckpt, sft], "batch_size", "0", "--batch_size 0: must be >= 1"),
            ("evaluate.py", ev[1:] + [ckpt, sft], "threads", "0", "--threads 0: must be >= 1"),
            ("retrieval.py", RETRIEVAL, "lr", "nan", "--lr nan: not a finite number"),
            ("retrieval.py", RETRIEVAL, "num_threads", "0", "--num_threads 0: must be >= 1"),
            ("retrieval.py", RETRIEVAL, "epochs", "0", "--epochs 0: must be >= 1")):
        o = out()
        argv = [script, *base, "--out_dir", o, f"--{flag}", *value.split()]
        T.append(Try(f"{script} --{flag} {value}", argv, (says,),
                     check=lambda o=o: not os.path.exists(o)))
    # unwritable outputs: fail at once, before the work
    for script, base in (("train_sft.py", SFT), ("train_rft.py", rft[1:]), ("evaluate.py", ev[1:] + [ckpt, sft]),
                         ("retrieval.py", RETRIEVAL)):
        T.append(Try(f"{script} --out_dir /proc/x", [script, *base, "--out_dir", "/proc/x"],
                     ("--out_dir /proc/x: cannot write there",)))
    # runs and checkpoints
    T.append(Try("train_sft.py --resume where there is no run", ["train_sft.py", *SFT, "--resume", "--out_dir", out()],
                 ("no checkpoint to resume from",)))
    T.append(Try("train_sft.py: a new run where one is held", ["train_sft.py", *SFT, "--out_dir", sft],
                 ("holds a run (checkpoint step-000004): pass --resume",)))
    o = out()
    T.append(Try("train_sft.py --lr 1e6 (divergence)", ["train_sft.py", *SFT, "--lr", "1e6", "--save_every", "1",
                                                         "--max_bad_steps", "2", "--out_dir", o],
                 ("consecutive steps with NaN/inf gradients", "the last good checkpoint is"),
                 check=lambda o=o: finite_latest(o)))
    o = out()
    T.append(Try("train_rft.py --lr 1e6 (divergence)", [*rft, "--lr", "1e6", "--save_every", "1", "--max_bad_steps",
                                                         "1", "--out_dir", o],
                 ("consecutive steps with NaN/inf gradients",), check=lambda o=o: finite_latest(o)))
    run_copies = [copy(sft) for _ in range(7)]
    a, b, c, e, f, g, h = run_copies
    T.append(Try("--resume over a truncated latest adapter", ["train_sft.py", *SFT, "--resume", "--out_dir", a],
                 ("is truncated", "resuming from step-000002"), stops=False, check=latest_is(a, "step-000004"),
                 setup=lambda: truncate(f"{a}/step-000004/adapter/adapter_model.safetensors")))
    T.append(Try("--resume over a truncated train_state.pt", ["train_sft.py", *SFT, "--resume", "--out_dir", b],
                 ("train_state.pt is not a torch checkpoint", "resuming from step-000002"), stops=False,
                 check=latest_is(b, "step-000004"), setup=lambda: truncate(f"{b}/step-000004/train_state.pt")))
    T.append(Try("--resume over a deleted adapter file", ["train_sft.py", *SFT, "--resume", "--out_dir", c],
                 ("adapter_model.safetensors is missing", "resuming from step-000002"), stops=False,
                 check=latest_is(c, "step-000004"),
                 setup=lambda: os.remove(f"{c}/step-000004/adapter/adapter_model.safetensors")))
    T.append(Try("--resume with a LATEST of garbage bytes", ["train_sft.py", *SFT, "--resume", "--steps", "6",
                                                              "--out_dir", e],
                 ("not the name of a step directory", "resuming from step-000004"), stops=False,
                 check=latest_is(e, "step-000006"), setup=lambda: open(f"{e}/LATEST", "wb").write(b"\xff\x00\xfe" * 9)))
    T.append(Try("--resume --steps 2 on a step-4 run",
                 ["train_sft.py", *SFT, "--resume", "--steps", "2", "--out_dir", f],
                 ("the checkpoint is at step 4, past --steps 2",)))
    T.append(Try("a full disk while saving", ["train_sft.py", *SFT, "--resume", "--steps", "6", "--out_dir", g],
                 ("no space left on the device", "train_state.pt", "the last good checkpoint is"),
                 check=latest_is(g, "step-000004"), patch=full_disk))
    T.append(Try("--resume over a truncated base model", ["train_sft.py", *SFT, "--resume", "--out_dir", h],
                 ("its base model is damaged", "model.safetensors is truncated"),
                 setup=lambda: truncate(f"{h}/base/model/model.safetensors", 0.9)))
    adapter = "step-000004/adapter/adapter_model.safetensors"
    damaged = {"evaluate.py: LATEST of garbage bytes": (lambda r: open(f"{r}/LATEST", "wb").write(b"\x80" * 12),
                                                         "not the name of a step directory"),
               "evaluate.py: truncated adapter": (lambda r: truncate(f"{r}/{adapter}"),
                                                  "the newest intact one is step-000002"),
               "evaluate.py: deleted adapter file": (lambda r: os.remove(f"{r}/{adapter}"),
                                                     "adapter_model.safetensors"),
               "evaluate.py: truncated base model": (lambda r: truncate(f"{r}/base/model/model.safetensors", 0.9),
                                                     "its base model is damaged"),
               "evaluate.py: truncated train_state.pt": (lambda r: truncate(f"{r}/step-000004/train_state.pt"),
                                                         "train_state.pt does not load"),
               "train_rft.py: truncated SFT adapter": (lambda r: truncate(f"{r}/{adapter}"),
                                                       "--sft_dir")}
    for name, (damage, says) in damaged.items():
        r = copy(sft)
        argv = [*rft, "--sft_dir", r, "--out_dir", out()] if name.startswith("train_rft") else [*ev, ckpt, r]
        T.append(Try(name, argv, (says,), setup=lambda r=r, damage=damage: damage(r)))
    rr = copy(f"{d}/retriever_eval")
    T.append(Try("evaluate.py: truncated retriever", [*ev, ckpt, sft, "--eval_retriever", rr], ("is truncated",),
                 setup=lambda: truncate(f"{rr}/model.safetensors")))
    o = out()
    T.append(Try("train_rft.py: truncated retriever",
                 [*rft, "--eval_retriever", rr, "--eval_samples", "4", "--out_dir", o],
                 ("--eval_retriever", "is truncated"), check=lambda: not os.path.exists(o)))
    T.append(Try("train_rft.py --n_train of another benchmark", [*rft, "--n_train", "40", "--out_dir", out()],
                 ("--n_train 40: the SFT run", "pass --n_train 48")))
    T.append(Try("train_rft.py --sft_dir missing", [*rft, "--sft_dir", f"{d}/nowhere", "--out_dir", out()],
                 ("--sft_dir",)))
    # caches: a damaged cache is made again, saying so
    cache = f"{d}/cache-copy"
    T.append(Try("a truncated benchmark cache", ["retrieval.py", *RETRIEVAL, "--out_dir", out()],
                 ("posebench cache", "building it again"), stops=False, setup=lambda: damage_cache(cache, "posebench"),
                 patch=lambda: cache_env(cache)))
    cache2 = f"{d}/cache-copy2"
    T.append(Try("a truncated caption-embedding cache", ["retrieval.py", *RETRIEVAL, "--out_dir", out()],
                 ("caption cache", "encoding again"), stops=False, setup=lambda: damage_cache(cache2, "retrieval"),
                 patch=lambda: cache_env(cache2)))
    # real data files (evaluate.py's real test sets, read the way training reads them)
    npz = f"{d}/eval.npz"
    for name, arrays, says in (("an npz with NaN ground-truth keypoints", "nan", "NaN/inf ground-truth keypoints"),
                               ("an npz with 0 records", "empty", "no records"),
                               ("an npz that is not a zip", "text", "not a readable npz"),
                               ("a truncated npz", "cut", "not a readable npz")):
        p = copy(npz)
        T.append(Try(name, [*real, "--eval_npz", f"3DPW={p}={d}/images", "--out_dir", out()], (says, p),
                     setup=lambda p=p, how=arrays: damage_npz(p, how)))
    ps_args = ["--amass_dir", f"{d}/amass", *ret]
    for name, captions, says, stops in (
            ("a PoseScript caption file that is a list", ["The knee is bent."] * 36, "holds a list", True),
            ("an empty caption", {**{str(i): "Bent." for i in range(36)}, "3": ""}, "record '3': an empty caption",
             True),
            ("four 100,000-character captions", {**{str(i): "Bent." for i in range(36)},
                                                 **{str(i): "The left knee is bent. " * 4400 for i in range(4)}},
             "4 caption(s) longer than 2000 characters cut to 2000", False)):  # then to the tiny model's positions
        p, o = copy(f"{d}/posescript"), out()
        says = (says, "tokens (the longest") if not stops else (says,)
        T.append(Try(name, [*real, "--posescript_dir", p, *ps_args, "--out_dir", o], says, stops=stops,
                     check=(lambda o=o: os.path.exists(f"{o}/results.json")) if not stops else None,
                     setup=lambda p=p, c=captions: json.dump(c, open(f"{p}/posescript_human_6293.json", "w"))))
    am = copy(f"{d}/amass")
    T.append(Try("a truncated AMASS sequence", [*real, "--posescript_dir", f"{d}/posescript", "--amass_dir", am, *ret,
                                                "--out_dir", out()], ("a_poses.npz: not a readable npz",),
                 setup=lambda: truncate(f"{am}/CMU/a_poses.npz")))
    return T


def damage_npz(path: str, how: str) -> None:
    with np.load(path) as z:
        arrays = dict(z)
    if how == "nan":
        arrays["extra_keypoints_3d"][1, 3, 0] = np.nan
        np.savez(path, **arrays)
    elif how == "empty":
        np.savez(path, **{k: v[:0] for k, v in arrays.items()})
    elif how == "text":
        with open(path, "w") as fh:
            fh.write("imgname,center,scale\n")
    else:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)


def damage_cache(copy_to: str, which: str) -> None:
    """A copy of the cache with one file of `which` (posebench, retrieval) cut in half."""
    import plumbing
    shutil.copytree(plumbing.cache_dir(), copy_to)
    for root, _, files in sorted(os.walk(os.path.join(copy_to, which))):
        for name in sorted(files):
            if name.endswith(".npz"):
                path = os.path.join(root, name)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                return


@contextlib.contextmanager
def cache_env(path: str):
    old = os.environ["POSE_RFT_CACHE"]
    os.environ["POSE_RFT_CACHE"] = path
    try:
        yield
    finally:
        os.environ["POSE_RFT_CACHE"] = old


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run only the tries whose name holds this text")
    p.add_argument("--keep", default="",
                   help="build the assets and keep them in this directory (default: a temporary one)")
    args = p.parse_args(argv)
    d = args.keep or tempfile.mkdtemp(prefix="pose_rft_reliability_")
    os.makedirs(d, exist_ok=True)
    os.environ["POSE_RFT_CACHE"] = os.path.join(d, "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["TQDM_DISABLE"] = "1"
    sys.path.insert(0, ROOT)
    t0 = time.time()
    build_assets(d)
    counts = dict.fromkeys(OUTCOMES, 0)
    print(f"assets built in {time.time() - t0:.0f} s in {d}")
    for t in tries(d):
        if args.only not in t.name:
            continue
        if t.setup:
            t.setup()
        t1 = time.time()
        with (t.patch() if t.patch else contextlib.nullcontext()):
            code, text = run_script(t.argv)
        result = outcome(t, code, text)
        counts[result] += 1
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
        print(f"{result:15s} {time.time() - t1:5.1f} s  {t.name}: {last[0][:160]}", flush=True)
        if result in ("traceback", "unclear error", "silent or lossy"):
            print("    " + text[-1500:].replace("\n", "\n    "))
    print(f"\n| inputs tried | clear errors | handled | unclear errors | tracebacks | silent or lossy |\n"
          f"|---|---|---|---|---|---|\n| {sum(counts.values())} | "
          + " | ".join(str(counts[k]) for k in OUTCOMES) + " |")
    print(f"wall time {time.time() - t0:.0f} s")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return counts


if __name__ == "__main__":
    main()

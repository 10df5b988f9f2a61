"""The report: Pose-RFT's tables and figures in miniature, measured here by one command (§4:
Tables 1-3, 5, 6, Figures 4-6).

`python report.py` runs these stages as subprocesses, each timed, its stdout and stderr streamed
to results/logs/<stage>.log:

    posebench           python posebench.py                           the benchmark (cached by configuration)
    stage0_s<seed>      python train_sft.py --stage0_only true        stage 0 (the pose encoder, CLIP tower, tiny
                                                                      LM), cached by configuration and seed
    retrieval           python retrieval.py                           the reward and evaluator retrievers
    sft_s<seed>         python train_sft.py                           SFT, Gaussian head (the paper's)
    sft_det_s<seed>     python train_sft.py --deterministic_head      Table 3's baseline: mean-only head, L2
    rft_s<seed>         python train_rft.py                           HyGRPO from sft = Pose-RFT
    rft_grpo_s<seed>    python train_rft.py --hybrid false            plain GRPO from sft (Figure 4)
    eval_<run>          python evaluate.py --ckpt results/ckpt/<run>  every run on the test split

and writes results/REPORT.md: the headline table (SFT vs Pose-RFT on every metric of evaluate.py),
Table 3 in miniature, Figure 4 (results/figure4_reward_curves.png), Figures 5/6
(results/figure5_text_to_pose.png, results/figure6_image_to_pose.png: ground truth, SFT and
Pose-RFT rendered by the benchmark's renderer, render.py), the time of every stage and the machine.
`--full` adds Table 3's extra row (rft_det_s<seed>: `train_rft.py --deterministic_head` from sft_det,
HyGRPO sampling the deterministic head's fixed spread; not in the paper), Table 5 (each reward
zero-masked: `--zero_reward NAME`), Table 6 (RFT rewarded by the evaluator retriever instead, each run
measured by both retrievers) and three seeds for every run, reported as mean ± std (sample std over
seeds). `--seeds 0 1 2` alone gives the default runs over three seeds.

The neighbours' runs, behind flags (each adds about 10 to 20 min a seed; the default report is unchanged):
    --direct true     rft_direct_s<seed>: `train_rft.py --algo direct` from sft (DrPose-style direct reward
                      fine-tuning) and a table of it beside HyGRPO, by both retrievers
    --abstract true   sft_abs_s<seed>, sft_abs_nr_s<seed> (`train_sft.py --mix 0.4 0.4 0.2 0 0 0.4`, with and
                      without `--reasoning`), rft_abs_s<seed>, rft_abs_nr_s<seed> (HyGRPO from each), and the
                      abstract-prompt table (CoT-Pose's task; evaluate.py's abstract_to_pose/* metrics)
    --pose_input true sft_pin_s<seed> (`train_sft.py --mix 0.3 0.3 0.2 0.1 0.1`: + pose_to_text, pose_edit),
                      rft_pin_s<seed> (HyGRPO from it, the same mixture), and a table per task (UniPose's,
                      PoseLLaVA's and PoseFix's; evaluate.py's pose_to_text/* and pose_edit/* metrics)

Training scripts run with their defaults (their default step counts); their own final
evaluation is switched off (`--eval_samples 0`): the eval stages run the same code path
(evaluate.evaluate_policy) with both retrievers. `--sft_args`, `--rft_args`, `--retrieval_args`
and `--eval_args` append flags to those commands (tests pass tiny budgets through them).

A stage is skipped when results/stages/<stage>.json records the same command, its outputs
exist, and no stage it depends on finished after it started; `--force` reruns every stage. A
training or eval stage that reruns starts from an empty output directory.

Run:
    python report.py                   # the demo: one seed, two independent stages at a time (--jobs 2)
    python report.py --full            # + Tables 5 and 6, seeds 0, 1, 2
    python report.py --jobs 1          # one stage at a time, with all --threads
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

import figures
import plumbing
import tables

ROOT = os.path.dirname(os.path.abspath(__file__))
REWARD_NAMES = ("joint", "semantic", "format", "text")  # rewards.REWARD_NAMES (Table 5 rows)

# kind: (script, extra flags, SFT kind it starts from). Names are <kind>_s<seed>.
RUNS = {
    "sft": ("train_sft.py", [], None),
    "sft_det": ("train_sft.py", ["--deterministic_head", "true"], None),
    "rft": ("train_rft.py", [], "sft"),
    "rft_grpo": ("train_rft.py", ["--hybrid", "false"], "sft"),
}
FULL_RUNS = {
    "rft_det": ("train_rft.py", ["--deterministic_head", "true"], "sft_det"),  # Table 3's extra row (not in the paper)
    **{f"rft_zero_{r}": ("train_rft.py", ["--zero_reward", r], "sft") for r in REWARD_NAMES},
    "rft_xret": ("train_rft.py", [], "sft"),  # rewarded by the evaluator retriever (Table 6)
}
DIRECT_RUNS = {"rft_direct": ("train_rft.py", ["--algo", "direct"], "sft")}  # --direct (issue 22)
ABSTRACT_MIX = ["--mix", "0.4", "0.4", "0.2", "0", "0", "0.4"]  # the default mixture + abstract_to_pose
ABSTRACT_RUNS = {  # --abstract (issue 22): CoT-Pose's abstract prompts, with reasoning and the control without
    "sft_abs": ("train_sft.py", ABSTRACT_MIX, None),
    "sft_abs_nr": ("train_sft.py", [*ABSTRACT_MIX, "--reasoning", "false"], None),
    "rft_abs": ("train_rft.py", [*ABSTRACT_MIX, "--max_new_tokens", "48"], "sft_abs"),
    "rft_abs_nr": ("train_rft.py", [*ABSTRACT_MIX, "--reasoning", "false", "--max_new_tokens", "48"], "sft_abs_nr"),
}
POSE_INPUT_MIX = ["--mix", "0.3", "0.3", "0.2", "0.1", "0.1"]  # the default tasks + pose_to_text, pose_edit
POSE_INPUT_RUNS = {  # --pose_input: the pose as input (UniPose, PoseLLaVA, PoseFix's tasks)
    "sft_pin": ("train_sft.py", POSE_INPUT_MIX, None),
    "rft_pin": ("train_rft.py", POSE_INPUT_MIX, "sft_pin"),
}


@dataclass
class Args:
    out_dir: str = field(default="results", metadata={"help": "REPORT.md, PNGs, logs/, stages/, ckpt/, eval/"})
    preset: str = field(default="tiny", metadata={"help": "model preset of every run (tiny, smol)"})
    full: bool = field(default=False, metadata={"help": "add Table 5, Table 6 and seeds 0, 1, 2"})
    seeds: list[int] = field(default_factory=list, metadata={"help": "seeds of every run (default: 0; --full: 0 1 2)"})
    force: bool = field(default=False, metadata={"help": "rerun every stage even if its output is complete"})
    jobs: int = field(default=2, metadata={
        "help": "stages run at the same time (independent ones). Two one-thread stages use 2 cores better "
                "than one two-thread stage: a tiny-preset step does not scale to 2 threads"})
    threads: int = field(default=2, metadata={"help": "CPU threads in all; each stage gets max(1, threads // jobs)"})
    n_train: int = field(default=20000, metadata={"help": "posebench training poses"})
    n_val: int = field(default=1000, metadata={"help": "posebench validation poses"})
    n_test: int = field(default=1000, metadata={"help": "posebench test poses"})
    sft_args: str = field(default="", metadata={"help": "extra flags for every train_sft.py (e.g. tiny budgets)"})
    rft_args: str = field(default="", metadata={"help": "extra flags for every train_rft.py"})
    retrieval_args: str = field(default="", metadata={"help": "extra flags for retrieval.py"})
    eval_args: str = field(default="", metadata={"help": "extra flags for every evaluate.py --ckpt"})
    n_figure: int = field(default=6, metadata={"help": "test examples per task in Figures 5 and 6"})
    direct: bool = field(default=False, metadata={
        "help": "add `train_rft.py --algo direct` from sft (DrPose-style) and its table beside HyGRPO"})
    abstract: bool = field(default=False, metadata={
        "help": "add the abstract-prompt runs (SFT and HyGRPO, with and without reasoning) and their table"})
    pose_input: bool = field(default=False, metadata={
        "help": "add the pose-input runs (SFT and HyGRPO with pose-to-text and pose editing in the mixture) and "
                "their two tables"})


# ---- Stages: plan, skip, run ----------------------------------------------------------------

@dataclass
class Stage:
    """One subprocess: `python cmd...` in the repository root."""
    name: str
    cmd: list
    outputs: list                  # files that exist once it has completed
    deps: list = field(default_factory=list)
    clear: list = field(default_factory=list)  # directories emptied before it (re)runs
    what: str = ""                 # one line for the report's time table


def seeds_of(args: Args) -> list:
    return list(args.seeds) or ([0, 1, 2] if args.full else [0])


def run_kinds(args: Args) -> dict:
    return {**RUNS, **(FULL_RUNS if args.full else {}), **(DIRECT_RUNS if args.direct else {}),
            **(ABSTRACT_RUNS if args.abstract else {}), **(POSE_INPUT_RUNS if args.pose_input else {})}


def plan(args: Args) -> list:
    """Every stage of the report, in an order that respects dependencies: trainings first, then the
    evaluations, so that a free slot starts the next (long) training before a (short) evaluation."""
    import posebench

    out = os.path.abspath(args.out_dir)
    ck, ev = os.path.join(out, "ckpt"), os.path.join(out, "eval")
    bench = ["--n_train", str(args.n_train), "--n_val", str(args.n_val), "--n_test", str(args.n_test)]
    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    th = str(max(1, args.threads // args.jobs))
    retr = {r: os.path.join(ck, f"retriever_{r}") for r in ("reward", "eval")}
    stages = [
        Stage("posebench", ["posebench.py", *bench, "--preview", os.path.join(out, "posebench_preview.png")],
              [os.path.join(posebench.bench_dir(cfg), "meta.json")], what="`posebench.py`"),
        Stage("retrieval", ["retrieval.py", *bench, "--out_dir", ck, "--num_threads", th,
                            *shlex.split(args.retrieval_args)],
              [os.path.join(retr[r], "model.safetensors") for r in retr], ["posebench"], what="`retrieval.py`"),
    ]
    evals = []
    for seed in seeds_of(args):
        enc = os.path.join(ck, f"stage0_s{seed}")
        stages.append(Stage(f"stage0_s{seed}", ["train_sft.py", *bench, "--preset", args.preset, "--seed", str(seed),
                                                "--stage0_only", "true", "--out_dir", enc, "--threads", th,
                                                *shlex.split(args.sft_args)],
                            [os.path.join(enc, "stage0.json")], ["posebench"], [enc],
                            "`train_sft.py --stage0_only true`: the encoders and LM both SFT runs share"))
        for kind, (script, flags, sft) in run_kinds(args).items():
            name = f"{kind}_s{seed}"
            common = [*bench, "--preset", args.preset, "--seed", str(seed), "--out_dir", os.path.join(ck, name),
                      "--eval_samples", "0", "--threads", th]
            what = f"`{shlex.join([script, *flags])}`"
            if script == "train_sft.py":
                cmd, deps = [script, *common, *flags, *shlex.split(args.sft_args)], [f"stage0_s{seed}"]
            else:
                reward = retr["eval"] if kind == "rft_xret" else retr["reward"]
                cmd = [script, *common, "--sft_dir", os.path.join(ck, f"{sft}_s{seed}"), "--reward_retriever",
                       reward, "--eval_retriever", retr["eval"], *flags, *shlex.split(args.rft_args)]
                deps = [f"{sft}_s{seed}", "retrieval"]
                what += f" from {sft}_s{seed}" + (", rewarded by the evaluator retriever" if kind == "rft_xret" else "")
            stages.append(Stage(name, cmd, [os.path.join(ck, name, "LATEST")], deps, [os.path.join(ck, name)], what))
            evals.append(Stage(
                f"eval_{name}", ["evaluate.py", "--ckpt", os.path.join(ck, name), "--out_dir", os.path.join(ev, name),
                                 "--preset", args.preset, *bench, "--eval_retriever", retr["eval"],
                                 "--reward_retriever", retr["reward"], "--threads", th, *shlex.split(args.eval_args)],
                [os.path.join(ev, name, "results.json")], [name, "retrieval"], [os.path.join(ev, name)],
                f"`evaluate.py --ckpt {name}`"))
    return stages + evals


class StageFailed(RuntimeError):
    pass


class Runner:
    """Runs stages (up to `jobs` at once), skipping complete ones; remembers its subprocesses."""

    def __init__(self, out_dir: str, jobs: int, force: bool):
        self.out_dir, self.jobs, self.force = out_dir, jobs, force
        self.procs, self.lock, self.stopping = set(), threading.Lock(), False
        self.commit = code_version()  # recorded in each stage's marker
        for d in ("logs", "stages"):
            os.makedirs(os.path.join(out_dir, d), exist_ok=True)

    def say(self, line: str):
        """One whole line to stdout (print from two threads can interleave a text and its newline)."""
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def marker_path(self, name: str) -> str:
        return os.path.join(self.out_dir, "stages", f"{name}.json")

    def complete(self, stage: Stage, done: dict) -> dict | None:
        """The stage's marker if it can be skipped: same command, outputs present, no newer dependency."""
        if self.force or not os.path.isfile(self.marker_path(stage.name)):
            return None
        with open(self.marker_path(stage.name)) as fh:
            marker = json.load(fh)
        if marker.get("cmd") != stage.cmd or not all(os.path.exists(p) for p in stage.outputs):
            return None
        if any(done[d]["finished_at"] > marker["started_at"] for d in stage.deps):
            return None
        return {**marker, "status": "earlier run"}

    def run(self, stage: Stage) -> dict:
        """Runs one stage; its output streams to logs/<name>.log. Raises StageFailed on a non-zero exit.
        The stage's marker is removed before its outputs are cleared, so a stage that fails or is
        interrupted is never taken for complete by a later run (its partial outputs stay unmarked)."""
        log = os.path.join(self.out_dir, "logs", f"{stage.name}.log")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.lock:
            if self.stopping:
                raise StageFailed(f"stage {stage.name} not started: another stage failed")
            if os.path.exists(self.marker_path(stage.name)):
                os.remove(self.marker_path(stage.name))
            for d in stage.clear:
                shutil.rmtree(d, ignore_errors=True)
            started = time.time()
            self.say(f"  {stage.name}: python {shlex.join(stage.cmd)}  (log: {log})")
            fh = open(log, "w")
            fh.write(f"$ python {shlex.join(stage.cmd)}\n")
            fh.flush()
            p = subprocess.Popen([sys.executable, *stage.cmd], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            self.procs.add(p)
        with fh:
            rc = p.wait()
            with self.lock:
                self.procs.discard(p)
        finished = time.time()
        if rc != 0:
            with open(log) as fh:
                tail = "".join(fh.readlines()[-25:])
            raise StageFailed(f"stage {stage.name} failed (exit code {rc}); its log is {log}. Last lines:\n{tail}")
        marker = {"cmd": stage.cmd, "seconds": round(finished - started, 1), "started_at": started,
                  "finished_at": finished, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "log": log,
                  "commit": self.commit}
        plumbing.atomic_write(self.marker_path(stage.name), lambda fh: json.dump(marker, fh, indent=1))
        self.say(f"  {stage.name}: done in {marker['seconds']:.0f} s")
        return {**marker, "status": "ran"}

    def run_all(self, stages: list) -> dict:
        """{stage name: marker + status} after running (or skipping) every stage. On a failure or an
        interrupt, the subprocesses still running are terminated (only those this runner started)."""
        todo, done, running = {s.name: s for s in stages}, {}, {}
        with ThreadPoolExecutor(self.jobs) as pool:
            try:
                while todo or running:
                    for name, s in list(todo.items()):
                        if len(running) >= self.jobs:
                            break
                        if all(d in done for d in s.deps):
                            del todo[name]
                            marker = self.complete(s, done)
                            if marker:
                                self.say(f"  {name}: complete ({marker['date']}), skipped")
                                done[name] = marker
                            else:
                                running[pool.submit(self.run, s)] = name
                    if not running:
                        if todo and not any(all(d in done for d in s.deps) for s in todo.values()):
                            raise StageFailed(f"stages {sorted(todo)} wait on stages that are not planned")
                        continue
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done[running.pop(f)] = f.result()
            except BaseException:
                with self.lock:
                    self.stopping = True
                    for p in self.procs:
                        p.terminate()
                raise
        return done


# ---- Reading results ------------------------------------------------------------------------

def load_runs(args: Args) -> dict:
    """{kind: [metrics of each seed]} from results/eval/<kind>_s<seed>/results.json (test split only)."""
    bench = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    runs = {}
    for kind in run_kinds(args):
        runs[kind] = []
        for s in seeds_of(args):
            path = os.path.join(args.out_dir, "eval", f"{kind}_s{s}", "results.json")
            record = tables.load_results(path, args.preset, bench)
            if record.get("split") != "test":
                raise ValueError(f"{path} was measured on the {record.get('split')} split; the report is of the test "
                                 "split: drop --split from --eval_args and rerun report.py")
            runs[kind].append(record["metrics"])
    return runs


def mrecall(m: dict, direction: str, retriever: str = "eval", protocol: str = "full") -> float | None:
    """mRecall (%): the mean of R@5, R@10, R@20 (Tables 3 and 5)."""
    vals = [m.get(f"text_to_pose/{retriever}_retriever/{protocol}/R{direction}@{k}") for k in tables.RETRIEVAL_KS]
    return None if any(v is None for v in vals) else float(np.mean(vals))


def row(label: str, ms: list, cols: list) -> list:
    """A table row: label, then one cell per (getter, decimals) column over the seeds' metrics."""
    return [label] + [tables.format_cell([get(m) for m in ms], 1.0, dec) for get, dec in cols]


def pose_columns() -> list:
    """Tables 3 and 5's columns: image MPJPE, PA-MPJPE (mm); mRecall T2P, P2T (%, evaluator, full protocol)."""
    return [(lambda m: m.get("image_to_pose/mpjpe_mm"), 1), (lambda m: m.get("image_to_pose/pa_mpjpe_mm"), 1),
            (lambda m: mrecall(m, "t2p"), 1), (lambda m: mrecall(m, "p2t"), 1)]


POSE_HEADER = ["image-to-pose MPJPE (mm) ↓", "PA-MPJPE (mm) ↓", "text-to-pose mRecall T2P (%) ↑",
               "mRecall P2T (%) ↑"]


# ---- The machine ----------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, torch and Python versions, GPU if any, the code's git commit."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "os": platform.platform(), "gpu": gpu, "commit": code_version()}


def code_version() -> str:
    """The code's git commit, "(with uncommitted changes)" when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (commit + (" (with uncommitted changes)" if dirty else "")) or "unknown"
    except OSError:
        return "unknown"


# ---- REPORT.md ------------------------------------------------------------------------------

def write_report(args: Args, done: dict, stages: list, t0: float, argv: list) -> str:
    """Writes out_dir/REPORT.md (tables from the eval stages' results.json, figures, stage times)."""
    runs = load_runs(args)
    seeds = seeds_of(args)
    out = args.out_dir
    n_seeds = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± std" if len(seeds) > 1
               else f"seed {seeds[0]}")
    record = tables.load_results(os.path.join(out, "eval", f"sft_s{seeds[0]}", "results.json"))
    m = machine()
    older = [n for n, d in done.items() if d.get("commit") != m["commit"]]
    code = f"code {m['commit']}" + (f"; {len(older)} of the {len(done)} stages ran with other code, named in the time "
                                    "table" if older else "")
    parts = [f"# Pose-RFT in miniature: the report\n\n"
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python report.py {shlex.join(argv)}` "
             f"({code}). Preset `{args.preset}`; posebench with {args.n_train} training, "
             f"{args.n_test} test poses; {n_seeds}. Every number is measured on the test split by "
             f"`evaluate.py --ckpt` ({record['eval_samples']} poses per pose task, the head's mean; "
             f"{record['eval_generate']} greedy answers per task). Recall@K in %; `eval` = the evaluator "
             f"retriever, `reward` = the reward retriever (App. H).\n"]

    # Headline: SFT vs Pose-RFT on every metric, the mean training pose beside.
    keys = [k for k in tables.metric_keys() if "mean_pose" not in k]
    mean_pose = [{k: m[k.replace("/mpjpe_mm", "/mean_pose_mpjpe_mm").replace("/pa_mpjpe_mm", "/mean_pose_pa_mpjpe_mm")]
                  for k in keys if k.endswith("_mm")} for m in runs["sft"]]
    parts.append("## Headline: SFT vs Pose-RFT, every metric\n\n" + tables.metrics_table(
        [("SFT", runs["sft"]), ("Pose-RFT (HyGRPO)", runs["rft"]), ("GRPO (`--hybrid false`)", runs["rft_grpo"]),
         ("always the mean training pose", mean_pose)], keys))

    # Does the policy see? Image-to-pose at <POSE> beside the stage-0 encoder alone (the miniature's HMR2.0).
    enc = []
    for s in seeds:
        with open(os.path.join(out, "ckpt", f"stage0_s{s}", "stage0.json")) as fh:
            enc.append(json.load(fh))
    get = lambda key: (lambda m: m.get(key))  # noqa: E731
    see_cols = [(get("image_to_pose/mpjpe_mm"), 1), (get("image_to_pose/pa_mpjpe_mm"), 1),
                (get("image_to_pose/root_error_deg"), 1),
                (lambda m: None if m.get("image_to_pose/gross_state_correct") is None
                 else 100 * m["image_to_pose/gross_state_correct"], 1)]
    enc_rows = [{"image_to_pose/mpjpe_mm": e["stage0/test/pose_vit_mpjpe_mm"],
                 "image_to_pose/pa_mpjpe_mm": e["stage0/test/pose_vit_pa_mpjpe_mm"],
                 "image_to_pose/root_error_deg": e.get("stage0/test/pose_vit_root_error_deg"),
                 "image_to_pose/gross_state_correct": e.get("stage0/test/pose_vit_gross_state_correct")} for e in enc]
    mean_rows = [{"image_to_pose/mpjpe_mm": m["image_to_pose/mean_pose_mpjpe_mm"],
                  "image_to_pose/pa_mpjpe_mm": m["image_to_pose/mean_pose_pa_mpjpe_mm"]} for m in runs["sft"]]
    parts.append("## Does the policy see? Image-to-pose against its encoder\n\n" + tables.markdown_table(
        ["read from", "MPJPE (mm) ↓", "PA-MPJPE (mm) ↓", "median root error (deg) ↓",
         "gross state right (%) ↑"],
        [row("the pose encoder alone (stage 0's readout of f_b's mean token)", enc_rows, see_cols),
         row("SFT, at `<POSE>`", runs["sft"], see_cols),
         row("Pose-RFT (HyGRPO), at `<POSE>`", runs["rft"], see_cols),
         row("always the mean training pose", mean_rows, see_cols)])
        + "\nThe encoder's root angle is that of its 6D readout ('-': its stage 0 recorded none). Gross state "
          "right: of the test bodies "
          "that are upright or lying (the benchmark's posecodes), the share predicted so, judged with the camera "
          "undone (leaning bodies have neither posecode).\n")

    # The paper's question: does HyGRPO improve on its SFT start? Per seed, then mean ± std.
    delta_keys = [("image_to_pose/mpjpe_mm", "image-to-pose MPJPE (mm)"),
                  ("image_to_pose/pa_mpjpe_mm", "image-to-pose PA-MPJPE (mm)"),
                  ("image_to_pose/root_error_deg", "image-to-pose median root error (deg)"),
                  ("text_to_pose/eval_retriever/full/Rt2p@10", "text-to-pose R@10 T2P, evaluator (%)"),
                  ("text_to_pose/eval_retriever/full/Rp2t@10", "text-to-pose R@10 P2T, evaluator (%)"),
                  ("text_to_pose/mpjpe_mm", "text-to-pose MPJPE (mm)")]
    dl = []
    for key, label in delta_keys:
        cells = [label]
        for kind in ("rft", "rft_grpo"):
            d = [None if a.get(key) is None or b.get(key) is None else a[key] - b[key]
                 for a, b in zip(runs[kind], runs["sft"])]
            cells.append(tables.format_cell(d, 1.0, 1))
        dl.append(cells)
    parts.append("## HyGRPO minus its SFT start\n\n" + tables.markdown_table(
        ["metric (RFT − SFT, per seed, then mean ± std)", "Pose-RFT (HyGRPO)", "GRPO (`--hybrid false`)"], dl)
        + "\nNegative is better for errors, positive for recall.\n")

    # Table 3 in miniature.
    cols = pose_columns()
    t3 = [row("Baseline (deterministic head, L2 SFT)", runs["sft_det"], cols),
          row("Baseline + Dist. (Gaussian head, NLL SFT)", runs["sft"], cols),
          row("Baseline + Dist. + RFT (Pose-RFT)", runs["rft"], cols)]
    note = ""
    if "rft_det" in runs:  # --full
        t3.append(row("Baseline + RFT (deterministic head, fixed spread)", runs["rft_det"], cols))
        note = (" The last row is not in the paper: HyGRPO on the deterministic head, sampling with its fixed "
                "spread (at the same --pose_temperature).")
    parts.append("## Table 3 in miniature: distributional modelling\n\n"
                 + tables.markdown_table(["method"] + POSE_HEADER, t3)
                 + "\nmRecall = mean of R@5, R@10, R@20 by the evaluator retriever, full-retrieval protocol."
                 + note + "\n")

    # Figure 4.
    png4 = os.path.join(out, "figure4_reward_curves.png")
    curves = {label: [figures.reward_rows(os.path.join(out, "ckpt", f"{kind}_s{s}", "metrics.jsonl")) for s in seeds]
              for label, kind in (("GRPO", "rft_grpo"), ("HyGRPO", "rft"))}
    figures.plot_figure4(curves, png4, REWARD_NAMES)
    t4 = []
    for label, seeds_rows in curves.items():
        cells = [label]
        for name in REWARD_NAMES:
            first, last = [], []
            for rows_ in seeds_rows:
                v = np.array([np.nan if r.get(f"rewards/{name}") is None else r[f"rewards/{name}"] for r in rows_])
                k = max(1, len(v) // 10)
                first.append(np.nanmean(v[:k]) if np.isfinite(v[:k]).any() else None)
                last.append(np.nanmean(v[-k:]) if np.isfinite(v[-k:]).any() else None)
            cells.append(f"{tables.format_cell(first, 1, 3)} → {tables.format_cell(last, 1, 3)}")
        t4.append(cells)
    parts.append("## Figure 4: GRPO vs HyGRPO, training rewards\n\n"
                 f"![Figure 4]({os.path.basename(png4)})\n\n"
                 "Mean reward over the first → the last tenth of the logged steps:\n\n"
                 + tables.markdown_table(["run"] + [f"rewards/{n}" for n in REWARD_NAMES], t4)
                 + "\nGRPO samples no pose: its pose rewards (joint, semantic) score the head's mean, HyGRPO's score "
                   "the sampled poses, so compare each curve's trend, not the two levels. `rewards/joint` is "
                   "1 / (mean joint distance in m + 0.01) (Eq. 7).\n")

    # Figures 5 and 6.
    pngs = figures.pose_figures(args, seeds[0])
    parts.append("## Figures 5 and 6: rendered poses\n\n"
                 f"![Figure 5]({os.path.basename(pngs['text_to_pose'])})\n\n"
                 f"![Figure 6]({os.path.basename(pngs['image_to_pose'])})\n\n"
                 "Rendered by the benchmark's renderer (left limbs blue, right limbs orange), each pose cropped to its "
                 "box. Text-to-pose: canonical orientation seen from 30° left, 15° up; the ground truth is the pose "
                 "the caption was written from, one of many that fit it. Image-to-pose: the camera's view frame.\n")

    if args.full:
        t5 = [row("Baseline (no RL)", runs["sft"], cols)]
        t5 += [row(f"w/o {n} reward (`--zero_reward {n}`)", runs[f"rft_zero_{n}"], cols) for n in REWARD_NAMES]
        t5.append(row("Pose-RFT (full model)", runs["rft"], cols))
        parts.append("## Table 5: each reward zero-masked\n\n" + tables.markdown_table(["method"] + POSE_HEADER, t5))
        t6 = []
        for measured, by in (("eval", "evaluator"), ("reward", "reward retriever")):
            cols6 = [(lambda m, d=d, k=k, r=measured: m.get(f"text_to_pose/{r}_retriever/full/R{d}@{k}"), 1)
                     for d in tables.DIRECTIONS for k in tables.RETRIEVAL_KS]
            for label, kind in (("SFT", "sft"), ("RFT rewarded by the reward retriever", "rft"),
                                ("RFT rewarded by the evaluator retriever", "rft_xret")):
                cells = row(label, runs[kind], cols6)
                t6.append([cells[0], by] + cells[1:])
        header6 = ["run", "measured by"] + [f"R{d.upper()}@{k} (%)" for d in tables.DIRECTIONS
                                            for k in tables.RETRIEVAL_KS]
        parts.append("## Table 6: cross-retriever evaluation\n\n" + tables.markdown_table(header6, t6)
                     + "\nFull-retrieval protocol. The paper measures its RFT model with an independent retriever "
                       "(PoseEmbroider); here each RFT run is measured by both of ours.\n")

    if args.direct:
        columns = [("SFT", runs["sft"]), ("Pose-RFT (HyGRPO)", runs["rft"]),
                   ("direct (`--algo direct`)", runs["rft_direct"])]
        parts.append("## Direct reward fine-tuning (DrPose-style) beside HyGRPO\n\n" + tables.direct_table(columns)
            + "\nThe direct run follows the exact gradient of the reward retriever's similarity (text-to-pose) and of "
              "Eq. 7 (image-to-pose) through a reparameterised sample; the evaluator retriever gave no reward.\n")
    if args.abstract:
        columns = [("SFT", runs["sft_abs"]), ("HyGRPO", runs["rft_abs"]),
                   ("SFT, `--reasoning false`", runs["sft_abs_nr"]),
                   ("HyGRPO, `--reasoning false`", runs["rft_abs_nr"])]
        parts.append("## Abstract prompts (CoT-Pose's task): reasoning before the pose, and without\n\n"
                     + tables.abstract_table(columns)
                     + "\n57 prompts (each archetype's three phrases), answered greedily; the pose is read at "
                       "`<POSE>` after the generated reasoning. PFD and MPJPE are to the nearest test pose of the "
                       "archetype, root aligned.\n")

    if args.pose_input:
        parts.append("## Pose as input: pose-to-text (UniPose's task)\n\n" + tables.pose_to_text_table(runs["sft_pin"],
                                                                                                       runs["rft_pin"])
                     + "\nR-precision as PoseScript computes it: the generated caption against its pose and 31 random "
                       "others, by the evaluator retriever, averaged over 10 draws. BLEU-4 and ROUGE-L against all of "
                       "the pose's captions; posecode truth: the share of the posecodes a caption states that are true "
                       "of the pose. The published rows are on PoseScript (real poses, human captions): for scale "
                       "only.\n")
        parts.append("## Pose as input: pose editing (PoseFix's and PoseLLaVA's task)\n\n"
                     + tables.pose_edit_table(runs["sft_pin"], runs["rft_pin"])
                     + "\nThe edited pose B is the head's mean at `<POSE>`; R@K of B among the true B of its group of "
                       "100 pairs (PoseLLaVA's protocol); posecode truth: the share of the instruction's posecodes "
                       "true of the predicted B. The published rows are on the PoseFix set (AMASS pairs, human "
                       "instructions): for scale only.\n")

    # Stage times and the machine.
    def measured_in(d: dict) -> str:
        when = "this run" if d["status"] == "ran" else f"earlier run ({d['date']})"
        return when if d.get("commit") == m["commit"] else f"{when}, code {d.get('commit', 'not recorded')}"
    st = [[f"`{s.name}`", s.what, f"{done[s.name]['seconds']:.0f}", measured_in(done[s.name])] for s in stages]
    stage_sum = sum(d["seconds"] for d in done.values())
    parts.append("## Time and machine\n\n"
                 + tables.markdown_table(["stage", "what", "seconds", "measured in"], st)
                 + f"\nSum of the stages: {stage_sum:.0f} s ({stage_sum / 60:.1f} min); this invocation, up to writing "
                   f"this page: {time.time() - t0:.0f} s, with {args.jobs} stage(s) at a time (logs: `logs/`, "
                   f"exact commands: `stages/*.json`).\n\n"
                 + f"Machine: {m['cpu']}, {m['cores']} cores; GPU: {m['gpu']}; torch {m['torch']}, Python "
                   f"{m['python']}, {m['os']}.\n")
    path = os.path.join(out, "REPORT.md")
    plumbing.atomic_write(path, lambda fh: fh.write("\n".join(parts)))
    return path


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop report.py as Ctrl-C does: Runner.run_all then terminates the stages it
    started (by default they would kill report.py alone and leave its stages writing)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv=None):
    from transformers import HfArgumentParser

    t0 = time.time()
    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"report.py: --jobs {args.jobs} and --threads {args.threads} must be >= 1")
    args.out_dir = os.path.abspath(args.out_dir)
    stages = plan(args)
    print(f"report: {len(stages)} stages -> {args.out_dir}", flush=True)
    stop_on_signals()
    try:
        done = Runner(args.out_dir, args.jobs, args.force).run_all(stages)
        path = write_report(args, done, stages, t0, sys.argv[1:] if argv is None else argv)
    except (StageFailed, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"report.py: {e}") from None
    total = time.time() - t0
    print(f"wrote {path}\ntotal time {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()

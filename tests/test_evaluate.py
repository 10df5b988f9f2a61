"""evaluate.py (the runner, results.json, the Markdown writer, torchrun sharding, bad input) and
report.py (the pipeline end to end with tiny budgets, skipping complete stages).

One tiny report run (module fixture) builds everything the other tests read: its SFT run is the
"tiny checkpoint", its eval stage is evaluate.py run in one process.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import evaluate
import figures
import plumbing
import posebench
import presets
import report
import tables
import vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]
CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
SFT = ("--stage0_pose_epochs 1 --stage0_clip_epochs 1 --stage0_lm_steps 3 --stage0_batch 16 --batch_size 8 "
       "--steps 4 --warmup_steps 1 --log_every 2")
RFT = "--steps 3 --batch_size 2 --group_size 4 --max_new_tokens 12 --log_every 1 --warmup_steps 1"
EVAL = ["--eval_samples", "40", "--eval_generate", "3"]
REPORT = [*BENCH, "--jobs", "2", "--threads", "2", "--n_figure", "2", "--sft_args", SFT, "--rft_args", RFT,
          "--retrieval_args", "--epochs 1 --embed_dim 16 --hidden_dim 32 --batch_size 16",
          "--eval_args", " ".join(EVAL)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A whole report with tiny budgets: results/ with ckpt/, eval/, logs/, stages/, REPORT.md, PNGs."""
    out = tmp_path_factory.mktemp("report") / "results"
    report.main(REPORT + ["--out_dir", str(out)])
    return out


def retriever_flags(results):
    return ["--eval_retriever", str(results / "ckpt" / "retriever_eval"),
            "--reward_retriever", str(results / "ckpt" / "retriever_reward")]


# ---- the report ------------------------------------------------------------------------------

def test_report_end_to_end(results):
    text = (results / "REPORT.md").read_text()
    for section in ("## Headline: SFT vs Pose-RFT", "## Does the policy see?", "the pose encoder alone",
                    "## HyGRPO minus its SFT start", "## Table 3 in miniature", "## Figure 4: GRPO vs HyGRPO",
                    "## Figures 5 and 6", "## Time and machine", "Machine: ", "torch "):
        assert section in text, section
    for key in tables.metric_keys():  # the headline lists every metric (the mean pose in its own column)
        assert "mean_pose" in key or f"`{key}`" in text, key
    for row in ("Baseline (deterministic head", "Baseline + Dist. (Gaussian", "Baseline + Dist. + RFT"):
        assert row in text
    assert " nan " not in text.lower() and "Table 5" not in text and "ran with other code" not in text
    for png in ("figure4_reward_curves.png", "figure5_text_to_pose.png", "figure6_image_to_pose.png",
                "posebench_preview.png"):
        head = (results / png).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and (results / png).stat().st_size > 10_000, png
    stages = [s.name for s in report.plan(report.Args(out_dir=str(results)))]
    assert len(stages) == 11 and {"stage0_s0", "rft_grpo_s0", "eval_rft_grpo_s0", "sft_det_s0"} <= set(stages)
    assert (results / "ckpt" / "stage0_s0" / "stage0.json").exists()  # one stage 0 for both SFT runs
    assert "rft_det_s0" not in stages  # --full only
    for name in stages:  # every stage logged and timed
        assert (results / "logs" / f"{name}.log").stat().st_size > 0
        assert json.loads((results / "stages" / f"{name}.json").read_text())["seconds"] > 0
        assert f"`{name}`" in text


def test_report_skips_complete_stages(results, capsys):
    before = (results / "stages" / "rft_s0.json").read_text()
    report.main(REPORT + ["--out_dir", str(results)])
    out = capsys.readouterr().out
    assert out.count("skipped") == 11 and "done in" not in out and "total time" in out
    assert (results / "stages" / "rft_s0.json").read_text() == before


def fake_runs(results, out, args, seeds, edit=lambda kind, seed, metrics: None) -> list:
    """Every run of `args`' report as copies of the tiny report's SFT or RFT results (and RFT's metrics.jsonl,
    stage 0's stage0.json), each seed's metrics edited in place by `edit(kind, seed, metrics)`; returns the plan
    (no training: the stages are then marked done)."""
    for kind in report.run_kinds(args):
        for seed in seeds:
            src = results / "eval" / ("rft_s0" if kind.startswith("rft") else "sft_s0")
            dst = out / "eval" / f"{kind}_s{seed}"
            shutil.copytree(src, dst)
            rec = json.loads((dst / "results.json").read_text())
            edit(kind, seed, rec["metrics"])
            (dst / "results.json").write_text(json.dumps(rec))
            if kind.startswith("rft"):
                (out / "ckpt" / f"{kind}_s{seed}").mkdir(parents=True)
                shutil.copy(results / "ckpt" / "rft_s0" / "metrics.jsonl", out / "ckpt" / f"{kind}_s{seed}")
    for seed in seeds:  # the encoder row of "Does the policy see?"
        (out / "ckpt" / f"stage0_s{seed}").mkdir(parents=True)
        shutil.copy(results / "ckpt" / "stage0_s0" / "stage0.json", out / "ckpt" / f"stage0_s{seed}")
    return report.plan(args)


def test_report_direct_and_abstract_tables(results, tmp_path):
    """--direct and --abstract (issue 22): their stages (flags and SFT starts) and tables, written from copies of
    the tiny runs' results with hand-set abstract_to_pose metrics (no training: the stages are marked done)."""
    args = report.Args(out_dir=str(tmp_path / "r"), direct=True, abstract=True, n_train=48, n_val=16, n_test=40,
                       n_figure=2)
    stages = report.plan(args)
    cmd = {s.name: s.cmd for s in stages}
    assert cmd["rft_direct_s0"][cmd["rft_direct_s0"].index("--algo") + 1] == "direct"
    assert cmd["rft_abs_nr_s0"][cmd["rft_abs_nr_s0"].index("--sft_dir") + 1].endswith("sft_abs_nr_s0")
    assert "--reasoning" in cmd["sft_abs_nr_s0"] and "--reasoning" not in cmd["sft_abs_s0"]
    assert cmd["rft_abs_s0"][cmd["rft_abs_s0"].index("--mix") + 6] == "0.4" and "48" in cmd["rft_abs_s0"]
    assert len(report.plan(report.Args(out_dir=str(tmp_path / "d")))) == len(stages) - 2 * 5  # default: as it was
    hand = {"abstract_to_pose/archetype_accuracy": 0.25, "abstract_to_pose/eval_retriever/pfd": 0.6162,
            "abstract_to_pose/nearest_mpjpe_mm": 124.91, "abstract_to_pose/consistency": None,
            "abstract_to_pose/archetype_accuracy_true_poses": 0.5}
    fake_runs(results, tmp_path / "r", args, [0], lambda kind, seed, m: m.update(hand if "abs" in kind else {}))
    done = {s.name: {"seconds": 2.0, "status": "ran", "date": "-"} for s in stages}
    text = open(report.write_report(args, done, stages, 0.0, ["--direct", "true"])).read()
    assert "## Direct reward fine-tuning (DrPose-style) beside HyGRPO" in text and "## Abstract prompts" in text
    rft = json.loads((results / "eval" / "rft_s0" / "results.json").read_text())["metrics"]
    key = "text_to_pose/reward_retriever/full/Rt2p@10"
    assert f"| `{key}` (%) ↑ | " in text and f"| {rft[key]:.1f} | {rft[key]:.1f} |" in text
    assert "| `abstract_to_pose/archetype_accuracy` (%) ↑ | 25.0 | 25.0 | 25.0 | 25.0 |" in text
    assert "| `abstract_to_pose/eval_retriever/pfd` (distance) ↓ | 0.616 |" in text
    assert "| `abstract_to_pose/consistency` (%) ↑ | - | - | - | - |" in text and "at 50.0 %, its ceiling" in text


def test_report_pose_input_tables(results, tmp_path):
    """--pose_input (pose-to-text, pose editing): its stages (the 5-weight mixture, RFT from its own SFT) and two
    tables, written from copies of the tiny runs' results with hand-set pose_to_text / pose_edit metrics over two
    seeds (no training: the stages are marked done): the paired difference, A unchanged, chance, published rows."""
    args = report.Args(out_dir=str(tmp_path / "r"), pose_input=True, seeds=[0, 1], n_train=48, n_val=16,
                       n_test=40, n_figure=2)
    stages = report.plan(args)
    cmd = {s.name: s.cmd for s in stages}
    assert cmd["sft_pin_s1"][cmd["sft_pin_s1"].index("--mix") + 1:][:5] == ["0.3", "0.3", "0.2", "0.1", "0.1"]
    assert cmd["rft_pin_s0"][cmd["rft_pin_s0"].index("--sft_dir") + 1].endswith("sft_pin_s0")
    assert "--mix" in cmd["rft_pin_s0"] and "eval_rft_pin_s1" in cmd
    rp = "pose_to_text/eval_retriever/R-precision@1"
    hand = {"sft_pin": [{rp: 10.0, "pose_to_text/eval_retriever/reference_R-precision@1": 36.0,
                         "pose_to_text/posecode_truth": 0.70, "pose_edit/mpjpe_mm": 160.0,
                         "pose_edit/copy_a_mpjpe_mm": 108.0, "pose_edit/eval_retriever/R@1": 17.0,
                         "pose_edit/eval_retriever/copy_a_R@1": 35.0},
                        {rp: 12.0, "pose_to_text/eval_retriever/reference_R-precision@1": 38.0,
                         "pose_to_text/posecode_truth": 0.72, "pose_edit/mpjpe_mm": 170.0,
                         "pose_edit/copy_a_mpjpe_mm": 110.0, "pose_edit/eval_retriever/R@1": 19.0,
                         "pose_edit/eval_retriever/copy_a_R@1": 37.0}],
            "rft_pin": [{rp: 13.0, "pose_to_text/posecode_truth": 0.75, "pose_edit/mpjpe_mm": 150.0},
                        {rp: 17.0, "pose_to_text/posecode_truth": 0.79, "pose_edit/mpjpe_mm": 166.0}]}
    fake_runs(results, tmp_path / "r", args, [0, 1],
              lambda kind, seed, m: m.update(hand[kind][seed] if kind in hand else {}))
    done = {s.name: {"seconds": 2.0, "status": "ran", "date": "-"} for s in stages}
    text = open(report.write_report(args, done, stages, 0.0, ["--pose_input", "true"])).read()
    assert "## Pose as input: pose-to-text" in text and "## Pose as input: pose editing" in text
    # SFT 11 ± 1.4, RFT 15 ± 2.8, paired +4 ± 1.4, own captions 37 ± 1.4, chance 3.1, PoseScript's captioner 91.6
    assert f"| `{rp}` (%) ↑ | 11.0 ± 1.4 | 15.0 ± 2.8 | 4.0 ± 1.4 | 37.0 ± 1.4 | 3.1 | 91.6 | 85.6 |" in text
    assert "| `pose_to_text/posecode_truth` (%) ↑ | 71.0 ± 1.4 | 77.0 ± 2.8 | 6.0 ± 1.4 | - | - | - | - |" in text
    assert ("| `pose_edit/mpjpe_mm` (mm) ↓ | 165.0 ± 7.1 | 158.0 ± 11.3 | -7.0 ± 4.2 | 109.0 ± 1.4 | 71.7 | 130.5 |"
            in text)
    assert "| `pose_edit/eval_retriever/R@1` (%) ↑ | 18.0 ± 1.4 |" in text
    assert "| 36.0 ± 1.4 | 37.0 | 25.0 | - | - |" in text


def test_full_report_tables_and_seeds(results, tmp_path):
    """--full's Tables 5 and 6 and the mean ± std over seeds, written from copies of the tiny runs'
    results (no training: the stages are marked done)."""
    args = report.Args(out_dir=str(tmp_path / "full"), full=True, seeds=[0, 1], n_train=48, n_val=16, n_test=40,
                       n_figure=2)
    stages = report.plan(args)
    assert len(stages) == 2 + 2 * (1 + 2 * 10)  # posebench, retrieval; per seed stage 0 and 10 runs, each with its eval
    order = {s.name: i for i, s in enumerate(stages)}  # dependencies first; every training before any eval
    assert all(order[d] < order[s.name] for s in stages for d in s.deps)
    assert max(i for n, i in order.items() if not n.startswith("eval_")) < min(
        i for n, i in order.items() if n.startswith("eval_"))
    assert {"rft_zero_format_s1", "eval_rft_xret_s0"} <= {s.name for s in stages}
    xret = next(s for s in stages if s.name == "rft_xret_s0").cmd
    assert xret[xret.index("--reward_retriever") + 1].endswith("retriever_eval")
    def shift(kind, seed, m):  # two seeds, 10 mm apart: std 7.1
        m["image_to_pose/mpjpe_mm"] += 10 * seed

    fake_runs(results, tmp_path / "full", args, [0, 1], shift)
    done = {s.name: {"seconds": 2.0, "status": "ran", "date": "-"} for s in stages}
    text = open(report.write_report(args, done, stages, 0.0, ["--full"])).read()
    assert "## Table 5: each reward zero-masked" in text and "## Table 6: cross-retriever evaluation" in text
    for r in report.REWARD_NAMES:
        assert f"w/o {r} reward (`--zero_reward {r}`)" in text
    assert "| RFT rewarded by the evaluator retriever | evaluator |" in text
    sft = json.loads((results / "eval" / "sft_s0" / "results.json").read_text())["metrics"]["image_to_pose/mpjpe_mm"]
    assert f"| `image_to_pose/mpjpe_mm` (mm) ↓ | {sft + 5:.1f} ± 7.1 |" in text
    assert "2 seeds (0, 1), mean ± std" in text and "Sum of the stages: 88 s" in text
    # markers without commit
    assert "44 of the 44 stages ran with other code" in text and "this run, code not recorded" in text
    val = tmp_path / "full" / "eval" / "sft_s1" / "results.json"
    val.write_text(json.dumps({**json.loads(val.read_text()), "split": "val"}))  # e.g. --eval_args "--split val"
    with pytest.raises(ValueError,
                       match="sft_s1/results.json was measured on the val split; the report is of the test"):
        report.write_report(args, done, stages, 0.0, ["--full"])


def test_runner_reruns_changed_and_stale_stages(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    A = report.Stage("a", ["-c", f"open({str(a)!r}, 'w').write('a')"], [str(a)])
    B = report.Stage("b", ["-c", f"print('hello from b'); open({str(b)!r}, 'w').write('b')"], [str(b)], ["a"])
    runner = report.Runner(str(tmp_path / "res"), jobs=2, force=False)
    status = lambda done: {k: v["status"] for k, v in done.items()}  # noqa: E731
    assert status(runner.run_all([A, B])) == {"a": "ran", "b": "ran"}
    assert "hello from b" in (tmp_path / "res" / "logs" / "b.log").read_text()
    assert status(runner.run_all([A, B])) == {"a": "earlier run", "b": "earlier run"}
    a.unlink()  # a's output is gone: a reruns, and b, which depends on it, too
    assert status(runner.run_all([A, B])) == {"a": "ran", "b": "ran"}
    B.cmd = B.cmd[:1] + [B.cmd[1] + " # changed"]  # another command: only b reruns
    assert status(runner.run_all([A, B])) == {"a": "earlier run", "b": "ran"}
    assert status(report.Runner(str(tmp_path / "res"), 1, force=True).run_all([A])) == {"a": "ran"}
    C = report.Stage("c", ["-c", "import sys, time; time.sleep(0.5); print('boom'); sys.exit(3)"], [])
    slow = report.Stage("slow", ["-c", "import time; time.sleep(60)"], [])
    t0 = time.time()  # c fails while slow runs: slow is terminated, not waited for
    with pytest.raises(report.StageFailed, match=r"(?s)stage c failed \(exit code 3\); its log is .*c\.log.*boom"):
        runner.run_all([slow, C])
    assert time.time() - t0 < 30 and not (tmp_path / "res" / "stages" / "slow.json").exists()
    marker = json.loads((tmp_path / "res" / "stages" / "a.json").read_text())
    assert marker["commit"] == report.code_version()


def test_figure4_aligns_seeds_by_step():
    """A seed that skipped a logging step (NaN rewards) is compared step by step, not row by row."""
    rows = lambda steps, v: [{"step": t, "rewards/joint": v * t, "rewards/semantic": None} for t in steps]  # noqa: E731
    steps, vals = figures.seed_curves([rows([1, 2, 3, 4], 1.0), rows([1, 3, 4], 2.0)], "joint")
    assert steps.tolist() == [1, 3, 4] and vals.tolist() == [[1.0, 3.0, 4.0], [2.0, 6.0, 8.0]]
    assert np.isnan(figures.seed_curves([rows([1], 1.0)], "semantic")[1]).all()


def test_runner_never_takes_a_failed_rerun_for_complete(tmp_path):
    """A stage reruns (its output was deleted), writes its output, then fails: the next run must run it
    again, not skip it on the first run's marker."""
    out, flag = tmp_path / "out.txt", tmp_path / "fail"
    D = report.Stage("d", ["-c", f"import os, sys; open({str(out)!r}, 'w').write('partial'); "
                           f"sys.exit(1 if os.path.exists({str(flag)!r}) else 0)"], [str(out)])
    runner = lambda: report.Runner(str(tmp_path / "res"), jobs=1, force=False)  # noqa: E731
    assert runner().run_all([D])["d"]["status"] == "ran"
    out.unlink()
    flag.touch()
    with pytest.raises(report.StageFailed, match="stage d failed"):
        runner().run_all([D])
    flag.unlink()
    assert runner().run_all([D])["d"]["status"] == "ran"


def test_sigterm_stops_the_stages_too(tmp_path):
    """kill <report.py's pid> must not leave its stages running (they would go on writing checkpoints)."""
    pid_file, stage, parent_py = tmp_path / "stage.pid", tmp_path / "stage.py", tmp_path / "parent.py"
    stage.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    parent_py.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport report\nreport.stop_on_signals()\n"
                         f"slow = report.Stage('slow', [{str(stage)!r}], [])\n"
                         f"report.Runner({str(tmp_path / 'res')!r}, 1, False).run_all([slow])\n")
    parent = subprocess.Popen([sys.executable, str(parent_py)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (pid_file.exists() and pid_file.read_text()) and time.time() - t0 < 60:
        time.sleep(0.2)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # terminated and reaped by report.py
        os.kill(child, 0)


# ---- evaluate.py ------------------------------------------------------------------------------

def test_evaluate_ckpt_produces_every_field(results):
    ev = results / "eval" / "sft_s0"
    rec = json.loads((ev / "results.json").read_text())
    assert rec["preset"] == "tiny" and rec["ckpt"] == os.path.abspath(results / "ckpt" / "sft_s0")
    assert rec["step"] == "step-000004" and rec["split"] == "test" and rec["pose"] == "mean"
    assert rec["bench"] == {"n_train": 48, "n_val": 16, "n_test": 40} and rec["bench_key"] == posebench.config_key(CFG)
    assert rec["eval_samples"] == 40 and rec["eval_generate"] == 3 and rec["world_size"] == 1
    m = rec["metrics"]
    assert list(m) and set(m) == set(tables.metric_keys())
    assert all(v is not None and math.isfinite(v) for v in m.values())
    for k, v in m.items():
        if k.endswith("_mm"):
            assert 0 < v < 2000, k
        elif "@" in k:
            assert 0 <= v <= 100, k
        elif k.endswith("answer_similarity"):
            assert -1 <= v <= 1, k
        elif k.endswith("_deg"):
            assert 0 <= v <= 180, k
        else:
            assert 0 <= v <= 1, k
    md = (ev / "results.md").read_text()
    assert all(f"`{k}`" in md for k in m)
    p = np.load(ev / "predictions.npz")
    assert p["image_to_pose/pose6d"].shape == (40, 144) and list(p["text_to_pose/index"]) == list(range(40))
    assert p["answers/vqa"].shape == (3,)


def test_torchrun_sharded_evaluation_equals_one_process(results, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # 2 processes under gloo on CPU, also where a GPU is
    flags = ["evaluate.py", "--ckpt", str(results / "ckpt" / "rft_s0"), *BENCH, *EVAL, *retriever_flags(results),
             "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                        *flags, "--out_dir", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one_dir = results / "eval" / "rft_s0"
    if torch.cuda.is_available():  # the report evaluated on the GPU: compare with one process on CPU
        one_dir = tmp_path / "one"
        r = subprocess.run([sys.executable, *flags, "--out_dir", str(one_dir)], cwd=ROOT, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one = json.loads((one_dir / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["metrics"].keys() == two["metrics"].keys()
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    p1, p2 = np.load(results / "eval" / "rft_s0" / "predictions.npz"), np.load(tmp_path / "two" / "predictions.npz")
    assert p1.files == p2.files
    for k in p1.files:
        if p1[k].dtype.kind == "f":
            np.testing.assert_allclose(p1[k], p2[k], atol=1e-5)
        else:
            assert (p1[k] == p2[k]).all(), k


def test_interleave_inverts_sharding():
    items = list(range(11))
    assert plumbing.interleave([items[r::3] for r in range(3)]) == items
    t = torch.arange(22.0).reshape(11, 2)
    assert torch.equal(plumbing.interleave([t[r::4] for r in range(4)]), t)  # a rank may hold fewer rows


def test_sampled_poses_follow_the_head_and_not_the_sharding(results):
    # sample_actions: the empirical covariance of many seeded draws is the Gaussian's
    g = torch.Generator().manual_seed(0)
    mean, W, var = torch.randn(1, 3, generator=g), 0.5 * torch.randn(1, 3, 2, generator=g), torch.rand(1, 3,
                                                                                                       generator=g)
    dist = torch.distributions.LowRankMultivariateNormal(mean.expand(4000, 3), W.expand(4000, 3, 2), var.expand(4000,
                                                                                                                3))
    x = evaluate.sample_actions(dist, list(range(4000)))
    torch.testing.assert_close(x.T.cov(), dist.covariance_matrix[0], atol=0.06, rtol=0.1)
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.06, rtol=0)
    # the policy's sampled poses: a function of (seed, task, pose index) only
    policy, tok, _ = presets.load_policy(str(results / "ckpt" / "sft_s0"), "tiny")
    samples = data.PoseBenchTasks("test", CFG).eval_samples("text_to_pose")[:7]
    full = evaluate.predict_poses(policy, tok, samples, "cpu", batch_size=4, sample_pose=True, seed=3)
    shards = [evaluate.predict_poses(policy, tok, samples[r::3], "cpu", batch_size=2, sample_pose=True, seed=3)
              for r in range(3)]
    torch.testing.assert_close(plumbing.interleave(shards), full, atol=1e-5, rtol=0)
    assert not torch.allclose(full, evaluate.predict_poses(policy, tok, samples, "cpu", sample_pose=True, seed=4))
    mean = evaluate.predict_poses(policy, tok, samples, "cpu")
    assert not torch.allclose(full, mean)
    # at temperature tau the same noise moves the pose tau times as far (covariance scaled by tau^2)
    cool = evaluate.predict_poses(policy, tok, samples, "cpu", batch_size=4, sample_pose=True, seed=3,
                                  pose_temperature=0.3)
    torch.testing.assert_close(cool - mean, 0.3 * (full - mean), atol=1e-5, rtol=1e-4)


def test_sampled_poses_default_to_the_rft_runs_temperature(results, tmp_path):
    """evaluate.py --sample_pose samples the policy RFT trained: the head at the run's --pose_temperature."""
    evaluate.main(["--ckpt", str(results / "ckpt" / "rft_s0"), "--out_dir", str(tmp_path), *BENCH,
                   *retriever_flags(results),
                   "--eval_samples", "8", "--eval_generate", "1", "--sample_pose", "--threads", "1"])
    assert json.loads((tmp_path / "results.json").read_text())["pose"] == "sample at tau 0.3"


def test_markdown_writer_on_fixed_numbers():
    sft = {"image_to_pose/mpjpe_mm": 362.2074, "text_to_pose/eval_retriever/full/Rt2p@10": 8.0,
           "text_to_pose/eval_retriever/random/Rp2t@5": None, "vqa/yes_no_accuracy": 0.695,
           "vqa/answer_similarity": 0.98012}
    seeds = [{"image_to_pose/mpjpe_mm": 350.0, "text_to_pose/eval_retriever/full/Rt2p@10": 9.0,
              "vqa/yes_no_accuracy": 0.7, "vqa/answer_similarity": 0.9},
             {"image_to_pose/mpjpe_mm": 354.0, "text_to_pose/eval_retriever/full/Rt2p@10": 12.0,
              "vqa/yes_no_accuracy": 0.8, "vqa/answer_similarity": 0.95}]
    assert tables.metrics_table([("SFT", sft), ("Pose-RFT", seeds)]) == (
        "| metric | SFT | Pose-RFT |\n"
        "|---|---|---|\n"
        "| `image_to_pose/mpjpe_mm` (mm) ↓ | 362.2 | 352.0 ± 2.8 |\n"
        "| `text_to_pose/eval_retriever/full/Rt2p@10` (%) ↑ | 8.0 | 10.5 ± 2.1 |\n"
        "| `text_to_pose/eval_retriever/random/Rp2t@5` (%) ↑ | - | - |\n"
        "| `vqa/answer_similarity` (cos) ↑ | 0.980 | 0.925 ± 0.035 |\n"
        "| `vqa/yes_no_accuracy` (%) ↑ | 69.5 | 75.0 ± 7.1 |\n")
    assert tables.markdown_table(["a", "b"], [["1", "2"], ["x", 3]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | 3 |\n"
    assert report.mrecall({f"text_to_pose/eval_retriever/full/Rt2p@{k}": v for k, v in ((5, 1.0), (10, 2.0), (20,
                                                                                                              6.0))},
                          "t2p") == 3.0


# ---- bad input ------------------------------------------------------------------------------

def test_checkpoint_without_weights_and_empty_split_are_named(results, tmp_path):
    with pytest.raises(SystemExit, match=r"--ckpt .*nowhere: no such directory; point --ckpt at a finished run"):
        evaluate.main(["--ckpt", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--ckpt .*empty holds no complete model weights \(missing: .*"
                       r"base/preset.json.*LATEST\); point --ckpt at a finished run"):
        evaluate.main(["--ckpt", str(tmp_path / "empty")])
    partial = tmp_path / "partial"  # the base model is there, the adapter is not
    shutil.copytree(results / "ckpt" / "sft_s0" / "base", partial / "base")
    (partial / "LATEST").write_text("step-000004")
    with pytest.raises(SystemExit, match=r"holds no complete model weights \(missing: .*step-000004/adapter/"
                       r"adapter_config.json"):
        evaluate.main(["--ckpt", str(partial)])
    sft = str(results / "ckpt" / "sft_s0")
    with pytest.raises(SystemExit, match=r"the test split to evaluate is empty \(--eval_samples 0, --n_test 40\)"):
        evaluate.main(["--ckpt", sft, "--eval_samples", "0"])
    with pytest.raises(SystemExit, match=r"the test split to evaluate is empty .*--n_test 0.*pass --eval_samples >= 1"):
        evaluate.main(["--ckpt", sft, "--n_test", "0"])
    with pytest.raises(SystemExit, match=r"holds a 'tiny' checkpoint, but --preset smol"):
        evaluate.main(["--ckpt", sft, "--preset", "smol"])
    with pytest.raises(SystemExit, match=r"retriever checkpoint .*nothing.* does not exist"):
        evaluate.main(["--ckpt", sft, *BENCH, "--threads", "1", "--eval_retriever", str(tmp_path / "nothing")])


def test_results_file_from_another_preset_is_named(results, tmp_path):
    path = results / "eval" / "sft_s0" / "results.json"
    good = path.read_text()
    rec = json.loads(good)
    other = tmp_path / "results.json"
    other.write_text(json.dumps({**rec, "preset": "smol"}))
    with pytest.raises(ValueError, match=r"results.json holds results of the 'smol' preset .* but the 'tiny' preset "
                       r"was asked for; delete it, or rerun `python evaluate.py --ckpt"):
        tables.load_results(str(other), preset="tiny")
    other.write_text(json.dumps({"image_to_pose/mpjpe_mm": 1.0}))  # e.g. a training run's test_metrics.json
    with pytest.raises(ValueError, match=r"results.json is not a results file of evaluate.py; delete it"):
        tables.load_results(str(other))
    with pytest.raises(ValueError, match=r"computed on another benchmark"):
        tables.load_results(str(path), bench={"n_train": 20000, "n_val": 1000, "n_test": 1000})
    try:  # the report refuses it too, naming the file
        path.write_text(json.dumps({**rec, "preset": "smol"}))
        with pytest.raises(SystemExit, match=r"report.py: .*eval/sft_s0/results.json holds results of the 'smol'"):
            report.main(REPORT + ["--out_dir", str(results)])
    finally:
        path.write_text(good)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node larger than the node's GPUs stops before NCCL starts, saying what to pass."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"local rank 1 but this node has 1 GPU\(s\): pass --nproc_per_node=1"):
        plumbing.setup_distributed()


# ---- nothing lost, nothing silent (docs/TRAINING.md, "Reliability") -------------------------------------

@pytest.fixture
def tiny_run(tmp_path):
    """An untrained tiny run directory (base, one adapter step) and untrained retrievers."""
    import retrieval
    tok = vocab.tiny_tokenizer(CFG)
    torch.manual_seed(0)
    base = presets.build_tiny(tok)
    presets.save_base(base, tok, str(tmp_path / "run" / "base"), "tiny")
    presets.apply_lora(base).save_pretrained(str(tmp_path / "run" / "step-000001" / "adapter"))
    (tmp_path / "run" / "LATEST").write_text("step-000001")
    for role in ("eval", "reward"):
        retrieval.save_retriever(retrieval.TextPoseRetriever(retrieval.RetrieverConfig(embed_dim=16, hidden_dim=32)),
                                 str(tmp_path / f"retriever_{role}"))
    return tmp_path, ["--ckpt", str(tmp_path / "run"), *BENCH, "--threads", "1", "--eval_samples", "4",
                      "--eval_generate", "2", "--eval_retriever", str(tmp_path / "retriever_eval"),
                      "--reward_retriever", str(tmp_path / "retriever_reward")]


def test_unwritable_out_dir_bad_flags_and_damaged_files_fail_before_evaluating(tiny_run, monkeypatch):
    d, flags = tiny_run
    monkeypatch.setattr(evaluate, "evaluate_policy", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(SystemExit, match=r"--out_dir /proc/x: cannot write there"):
        evaluate.main([*flags, "--out_dir", "/proc/x"])
    for bad, message in ((["--batch_size", "0"], "--batch_size 0: must be >= 1"),
                         (["--threads", "0"], "--threads 0: must be >= 1"),
                         (["--pose_temperature", "nan"], "--pose_temperature nan: not a finite number")):
        with pytest.raises(SystemExit, match=message):
            evaluate.main([*flags, *bad])
    weights = d / "retriever_eval" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-64])
    with pytest.raises(SystemExit,
                       match=r"evaluate.py: retriever checkpoint .*retriever_eval' is damaged: .*truncated"):
        evaluate.main(flags)
    weights.write_bytes(good)
    (d / "run" / "step-000001" / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit, match=r"step-000001/train_state.pt does not load"):
        evaluate.main(flags)
    (d / "run" / "LATEST").write_bytes(b"\x00\xff" * 20)
    with pytest.raises(SystemExit,
                       match=r"LATEST holds .*not the name of a step directory.*the newest intact one is step-000001"):
        evaluate.main(flags)

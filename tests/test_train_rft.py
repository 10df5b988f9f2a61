"""train_rft.py: smoke runs (HyGRPO, plain GRPO, a zero-masked reward, torchrun), exact resume,
a completion without <POSE>, NaN rewards, and bad arguments."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import posebench
import presets
import rewards
import rollout
import train_rft
import vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]
RFT = BENCH + ["--steps", "4", "--batch_size", "2", "--group_size", "4", "--max_new_tokens", "12", "--log_every", "1",
               "--eval_samples", "32", "--eval_generate", "4", "--threads", "1", "--warmup_steps", "1"]


def run(script, args, check=True, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, *script, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SFT run and tiny retrievers, built once for this file."""
    d = tmp_path_factory.mktemp("rft_assets")
    from test_train_sft import TINY_RUN
    run(["train_sft.py"], TINY_RUN + ["--out_dir", str(d / "sft")])
    run(["retrieval.py"], BENCH + ["--epochs", "1", "--embed_dim", "16", "--hidden_dim", "32", "--batch_size", "16",
                                   "--out_dir", str(d), "--num_threads", "1"])
    return d


def rft_args(assets, out, *extra):
    return RFT + ["--sft_dir", str(assets / "sft"), "--reward_retriever", str(assets / "retriever_reward"),
                  "--eval_retriever", str(assets / "retriever_eval"), "--out_dir", str(out), *extra]


def test_smoke_hybrid_and_metrics(assets, tmp_path):
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "rft"))
    assert "RFT done" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "rft" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "losses/pg_continuous" in x]
    assert len(train_rows) == 4
    for key in ("rewards/joint", "rewards/semantic", "rewards/format", "rewards/text", "losses/pg_discrete",
                "losses/kl_token", "losses/kl_pose", "charts/clipfrac_discrete", "charts/clipfrac_continuous",
                "charts/frac_zero_std_groups", "time/generate_s", "time/policy_s"):
        assert key in train_rows[-1], key
    test = rows[-1]
    assert "test/text_to_pose/eval_retriever/full/Rt2p@10" in test and "test_init/image_to_pose/pa_mpjpe_mm" in test
    assert (tmp_path / "rft" / "reward_curves.png").stat().st_size > 5000
    assert (tmp_path / "rft" / "base" / "preset.json").exists()


def test_plain_grpo_and_zero_masked_reward(assets, tmp_path):
    run(["train_rft.py"], rft_args(assets, tmp_path / "grpo", "--hybrid", "false", "--steps", "2", "--eval_samples",
                                   "0"))
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["losses/pg_continuous"] == 0 and x["losses/kl_pose"] == 0 for x in rows if "losses/pg_continuous" in x)
    run(["train_rft.py"], rft_args(assets, tmp_path / "z", "--zero_reward", "joint", "--steps", "2", "--eval_samples",
                                   "0"))
    rows = [json.loads(x) for x in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["rewards/joint"] in (0.0, None) for x in rows if "rewards/format" in x)
    # the probes of docs/FINDINGS.md finding 4: the root not explored, the joint reward after alignment
    run(["train_rft.py"], rft_args(assets, tmp_path / "abl", "--explore_root", "false", "--joint_reward_align",
                                   "procrustes", "--steps", "2", "--eval_samples", "0", "--fresh_samples", "true"))
    assert (tmp_path / "abl" / "LATEST").read_text() == "step-000002"
    # docs/FINDINGS.md finding 6: the pose ratio and KL on the rotations' marginal (with the root not explored too)
    # (the first run also evaluates on val: its metrics are named val/*, never test/*)
    for extra in (["--eval_split", "val", "--eval_samples", "8"], ["--explore_root", "false", "--eval_samples", "0"]):
        run(["train_rft.py"], rft_args(assets, tmp_path / "rot", "--pose_space", "rotations", "--steps", "2", *extra))
        rows = [json.loads(x) for x in (tmp_path / "rot" / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in rows if "losses/kl_pose" in x]
        assert train[0]["losses/kl_pose"] == pytest.approx(0.0, abs=1e-5)  # pi_theta = pi_ref at the first step
        assert all(np.isfinite(x["losses/total"]) and x["charts/ratio_pose_mean"] == pytest.approx(1.0) for x in train)
        if "val" in extra:
            assert "val/image_to_pose/mpjpe_mm" in rows[-1] and "val_init/image_to_pose/mpjpe_mm" in rows[-1]
            assert not any(k.startswith("test") for x in rows for k in x)
            assert (tmp_path / "rot" / "val_metrics.json").exists()
            assert not (tmp_path / "rot" / "test_metrics.json").exists()
        shutil.rmtree(tmp_path / "rot")


def test_exact_resume(assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(["train_rft.py"], rft_args(assets, a, "--eval_samples", "0"))
    run(["train_rft.py"], rft_args(assets, b, "--eval_samples", "0", "--stop_after", "2"))
    r = run(["train_rft.py"], rft_args(assets, b, "--eval_samples", "0", "--resume"))
    assert "flags that differ" not in r.stdout
    # nothing left to run
    r = run(["train_rft.py"], rft_args(assets, b, "--eval_samples", "0", "--resume", "--lr", "0.001"))
    assert "resume: flags that differ from the run being continued: --lr 0.001 (was 0.0001)" in r.stdout
    wa = load_file(str(a / "step-000004" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "step-000004" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_torchrun_keeps_whole_groups_per_rank_and_resumes_exactly(assets, tmp_path):
    """2 processes under gloo on CPU (also where a GPU is); a resumed run gives each rank its own
    random stream back, so it ends where the uninterrupted one does."""
    def torchrun(out, *extra):
        return run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", "train_rft.py"],
                   rft_args(assets, out, "--steps", "3", "--eval_samples", "0", *extra),
                   env_extra={"CUDA_VISIBLE_DEVICES": ""})
    a, b = tmp_path / "a", tmp_path / "b"
    r = torchrun(a)
    assert (a / "LATEST").read_text() == "step-000003", r.stderr[-2000:]
    torchrun(b, "--stop_after", "1")
    torchrun(b, "--resume")
    wa = load_file(str(a / "step-000003" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "step-000003" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_are_those_of_the_sampling_policy(temperature, monkeypatch):
    """logprobs() scores each sampled token under the distribution the sampler drew it from:
    softmax(logits / temperature), suppressed tokens masked."""
    import model
    cfg = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
    tok = vocab.tiny_tokenizer(cfg)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok)).eval()
    tasks = data.PoseBenchTasks("train", cfg, seed=0)
    args = train_rft.Args(temperature=temperature, max_new_tokens=8, group_size=2)
    scores, sample = [], model.sample

    def record(t, logits):  # the logits the sampler draws from, before the temperature
        scores.append(logits.clone())
        return logits
    monkeypatch.setattr(model, "sample", lambda *a, **kw: sample(*a, **kw, logits_processor=record))
    ro = rollout.rollout(policy, tok, [tasks[i] for i in range(4) for _ in range(2)], args, "cpu")
    with torch.no_grad():
        token_logp, _ = rollout.logprobs(policy, ro, rollout.suppressed_tokens(policy, tok), 1.0, temperature)
    sampled = ro.sequences[:, ro.prompt_len:, None]
    ref = torch.log_softmax(torch.stack(scores, 1) / temperature, -1).gather(-1, sampled).squeeze(-1)  # (N, T)
    m = ro.completion_mask
    assert m.sum() > 8 and torch.allclose(token_logp[m], ref[m], atol=1e-4)


def test_completion_without_pose_is_not_in_v_and_scores_format_zero():
    cfg = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
    tasks = data.PoseBenchTasks("train", cfg, seed=0)
    s = next(tasks[i] for i in range(40) if tasks[i].task == "image_to_pose")
    q = next(tasks[i] for i in range(40) if tasks[i].task == "vqa")
    samples = [s, s, q]
    ro = rollout.Rollout(sequences=None, attention_mask=None, completion_mask=None, pixel_values=None, prompt_len=0,
                         pose_pos=torch.tensor([40, -1, -1]), has_pose=torch.tensor([True, False, False]),
                         pose=torch.as_tensor(np.stack([s.pose6d.reshape(-1)] + [np.zeros(144, np.float32)] * 2)),
                         texts=[data.POSE_ANSWER, "The SMPL pose of this person is", q.answer])

    class Similarity:
        def __call__(self, a, b):
            return torch.full((len(a),), 0.5)

    import body
    r, r_d, r_c, valid, where = rewards.score(ro, samples, Similarity(), None, body.BodyModel(), train_rft.Args())
    assert valid.tolist() == [True, False, False] and r["format"].tolist() == [1.0, 0.0, 1.0]
    assert r["joint"][0] > 50 and r["joint"][1] == 0  # the exact pose: 1 / (0 + 1 cm)
    # Eq. 10 on the QA prompt only (§3.3: "in vision-language QA tasks"); a pose answer is a template
    assert r["text"].tolist() == [0.0, 0.0, 0.5] and where["text"].tolist() == [False, False, True]
    assert r_d.tolist() == [1.0, 0.0, 1.5]
    # plain GRPO on a step it does not log: the pose rewards, which no loss uses, are not computed
    r, r_d2, r_c, valid, where = rewards.score(ro, samples, Similarity(), None, body.BodyModel(), train_rft.Args(),
                                               pose_rewards=False)
    assert r["joint"].tolist() == [0.0, 0.0, 0.0] and not where["joint"].any() and valid.tolist() == [True, False,
                                                                                                      False]
    assert torch.equal(r_d2, r_d) and torch.equal(r_c, torch.zeros(3))


def test_nan_rewards_are_skipped_then_abort(assets, tmp_path, monkeypatch):
    import rewards
    monkeypatch.setattr(rewards, "format_reward", lambda c, *a: torch.full((len(c),), float("nan")))
    with pytest.raises(SystemExit, match="consecutive steps with NaN/inf rewards"):
        train_rft.main(rft_args(assets, tmp_path / "nan", "--max_bad_steps", "2"))
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped/nonfinite_reward"] for x in rows] == [1, 2]
    # a skipped last step still ends the run with its checkpoint (the weights of the step before)
    monkeypatch.undo()
    format_reward, calls = rewards.format_reward, []

    def nan_at_the_last_step(c, *a):
        calls.append(1)
        r = format_reward(c, *a)
        return torch.full_like(r, float("nan")) if len(calls) == 4 else r
    monkeypatch.setattr(rewards, "format_reward", nan_at_the_last_step)
    train_rft.main(rft_args(assets, tmp_path / "last", "--eval_samples", "0"))
    rows = [json.loads(x) for x in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped/nonfinite_reward"] == 1
    assert (tmp_path / "last" / "LATEST").read_text() == "step-000004"


def test_nan_rewards_on_one_rank_skip_the_step_on_every_rank(assets, tmp_path):
    """Under torchrun a rank that skipped a step alone would leave the other waiting in the gradient
    all-reduce: rank 1's NaN rewards must make rank 0 (which logs) skip too, then both abort."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {ROOT!r})\nimport rewards, train_rft\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    rewards.format_reward = lambda c, *a: torch.full((len(c),), float('nan'))\n"
                      "train_rft.main(sys.argv[1:])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521", str(script),
           *rft_args(assets, tmp_path / "nan", "--max_bad_steps", "2", "--eval_samples", "0")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0 and "2 consecutive steps with NaN/inf rewards" in r.stderr, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped/nonfinite_reward") for x in rows] == [1, 2]  # rank 0's own rewards were finite


def test_num_iterations_reuses_the_batch(assets, tmp_path):
    """--num_iterations 2: the second update's ratio is against the sampling policy (pi_old), so it
    moves off 1 and the clip can act; with the pose space's basis too, which stays the sampling one."""
    for space in ("params", "rotations"):
        out = tmp_path / space
        run(["train_rft.py"], rft_args(assets, out, "--num_iterations", "2", "--pose_space", space, "--steps", "4",
                                       "--eval_samples", "0"))
        train = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "losses/total" in x]
        assert len(train) == 4 and all(np.isfinite(x["losses/total"]) for x in train)
        # a batch of VQA prompts has no pose; a batch whose groups scored every pose alike has no pose advantage,
        # and its first update leaves the pose policy exactly as it was (the KL to pi_ref is 0 at the start,
        # and in float64 so is its gradient), so the ratio moves in some steps, not in each
        posed = [x for x in train if x["charts/frac_valid_pose"] > 0]
        assert any(abs(x["charts/ratio_pose_mean"] - 1) > 1e-3 for x in posed) and \
            any(x["charts/clipfrac_continuous"] > 0 for x in posed), \
            [(x["charts/ratio_pose_mean"], x["charts/clipfrac_continuous"]) for x in train]


def test_bad_arguments(assets, tmp_path):
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "none", "--resume"), check=False)
    assert r.returncode != 0 and "has no checkpoint to resume from" in r.stderr
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "g1", "--group_size", "1"), check=False)
    assert r.returncode != 0 and "needs G >= 2" in r.stderr
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "p", "--preset", "smol"), check=False)
    assert r.returncode != 0 and "holds a 'tiny' checkpoint, but the 'smol' preset" in r.stderr
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "z", "--zero_reward", "style"), check=False)
    assert r.returncode != 0 and "--zero_reward style" in r.stderr
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "a", "--joint_reward_align", "root"), check=False)
    assert r.returncode != 0 and "--joint_reward_align root" in r.stderr
    r = run(["train_rft.py"], rft_args(assets, tmp_path / "s", "--pose_space", "angles"), check=False)
    assert r.returncode != 0 and "--pose_space angles" in r.stderr


def test_probe_runs_on_an_sft_checkpoint(assets, tmp_path):
    """tools/probe.py end to end on the tiny SFT run: every objective's val curve, the root error, JSON."""
    from tools import probe
    out = tmp_path / "probe.json"
    res = probe.main(BENCH + ["--sft_dir", str(assets / "sft"), "--n_states", "16", "--steps", "2", "--eval_every", "1",
                              "--batch_size", "4", "--samples", "2", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["curves"]) == set(probe.OBJECTIVES) and saved["root_error"] == res["root_error"]
    assert set(saved["root_probes"]) == {"pose_states", "pose_encoder"}
    assert all(0 <= p["median_deg"] <= 180 for p in saved["root_probes"].values())
    for curve in saved["curves"].values():
        assert [step for step, _ in curve] == [0, 1, 2]
        assert all(np.isfinite([m["mpjpe_mm"], m["pa_mpjpe_mm"]]).all() for _, m in curve)
    assert len({json.dumps(c[0][1]) for c in saved["curves"].values()}) == 1  # every objective starts at SFT's head
    with pytest.raises(SystemExit):
        probe.main(["--sft_dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        probe.main(["--sft_dir", str(assets / "sft"), "--n_states", "4"])


# ---- nothing lost, nothing silent (docs/TRAINING.md, "Reliability") -------------------------------------

def test_a_diverging_run_stops_with_latest_on_finite_weights(assets, tmp_path):
    """--lr 1e6: its loss stays finite but the gradients go NaN; those steps are skipped, the run stops
    naming the last good checkpoint, and no checkpoint holds a NaN."""
    out = tmp_path / "lr"
    r = run(["train_rft.py"], rft_args(assets, out, "--lr", "1e6", "--save_every", "1", "--max_bad_steps", "2"),
            check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "consecutive steps with NaN/inf gradients" in r.stderr and "the last good checkpoint is" in r.stderr
    latest = out / (out / "LATEST").read_text()
    weights = load_file(str(latest / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_inputs_are_checked_before_any_write(assets, tmp_path):
    """Bad flags, an SFT run of another benchmark and a truncated retriever stop before out_dir is made."""
    out = tmp_path / "rft"
    for flags, message in ((["--steps", "-1"], "--steps -1: must be >= 1"),
                           (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
                           (["--pose_temperature", "0"], "--pose_temperature 0.0: must be > 0"),
                           (["--n_train", "40"], "--n_train 40: the SFT run .* was trained on the benchmark of "
                            "--n_train 48, .*pass --n_train 48")):
        with pytest.raises(SystemExit, match=message):
            train_rft.main(rft_args(assets, out, *flags))
    broken = tmp_path / "retriever_eval"
    shutil.copytree(assets / "retriever_eval", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SystemExit, match=r"--eval_retriever: retriever checkpoint .*retriever_eval' is damaged: "
                       r".*model.safetensors is truncated"):
        train_rft.main(rft_args(assets, out, "--eval_retriever", str(broken)))
    assert not out.exists()


def test_algo_direct(assets, tmp_path):
    """--algo direct (DrPose-style) on HyGRPO's prompts and budget: its own losses, a zero KL at the first
    step, every step applied; and the variants it has no meaning for are refused."""
    run(["train_rft.py"], rft_args(assets, tmp_path / "d", "--algo", "direct", "--steps", "3", "--eval_samples", "0"))
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if "losses/direct_reward" in x]
    assert len(train) == 3 and not any("losses/pg_continuous" in x for x in rows)
    # pi_init is pi_ref bit for bit (tests/test_reference.py); torch's closed-form KL of a low-rank Gaussian
    # with itself is not exactly 0 in float32, about 1e-4 a sample at these spreads
    assert train[0]["losses/kl_pose"] == pytest.approx(0.0, abs=2e-3)
    assert all(np.isfinite(x["losses/total"]) for x in train)
    assert (tmp_path / "d" / "LATEST").read_text() == "step-000003"
    for bad in (["--hybrid", "false"], ["--algo", "ppo"]):
        r = run(["train_rft.py"], rft_args(assets, tmp_path / "x", "--algo", "direct", *bad), check=False)
        assert r.returncode != 0 and "--algo" in r.stderr + r.stdout

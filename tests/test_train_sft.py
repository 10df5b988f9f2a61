"""train_sft.py: the SFT objective against a slow loop, a subprocess smoke run, exact resume,
a 2-process torchrun (gloo) giving the same gradients as one process, and a whole torchrun run."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import body
import data
import model
import plumbing
import posebench
import presets
import stage0
import train_sft
import vocab
from evaluate import evaluate_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
TINY_RUN = ["--n_train", "48", "--n_val", "16", "--n_test", "40", "--stage0_pose_epochs", "1",
            "--stage0_clip_epochs", "1", "--stage0_lm_steps", "3", "--stage0_batch", "16", "--batch_size", "8",
            "--steps", "4", "--warmup_steps", "1", "--log_every", "2", "--save_every", "100", "--eval_samples", "16",
            "--eval_generate", "4", "--head_fit_steps", "20", "--head_fit_samples", "16", "--threads", "1"]


def run(args, **kw):
    r = subprocess.run([sys.executable, "train_sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ), **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def tok():
    return vocab.tiny_tokenizer(CFG)


def test_sft_loss_matches_slow_reference(tok):
    torch.manual_seed(0)
    tasks = data.PoseBenchTasks("train", CFG, seed=0)
    b = data.collate([tasks[i] for i in range(6)], tok, 32)
    m = presets.build_tiny(tok, rank=2)
    logits, dist, _ = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    args = train_sft.Args(l2_6d_weight=0.5)
    n_tok, n_pose = 1000.0, 7.0  # global counts from other ranks
    loss, stats = train_sft.sft_loss(logits, b.labels, dist, b, args, n_tok, n_pose)
    ce, nll, l2 = 0.0, 0.0, 0.0
    for i in range(6):  # token by token: predict labels[t + 1] from position t
        for t in range(b.input_ids.shape[1] - 1):
            if b.labels[i, t + 1] != -100:
                ce -= torch.log_softmax(logits[i, t].double(), -1)[b.labels[i, t + 1]].item()
        if b.pose_valid[i]:
            target = b.pose6d[i].reshape(-1)
            single = model.gaussian(*[x[i:i + 1] for x in m.pose_head(
                m.model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                        position_ids=(b.attention_mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state[
                    torch.arange(6), b.pose_token_pos.clamp_min(0)])])
            nll -= single.log_prob(target[None]).item() / target.numel()
            l2 += ((dist.mean[i] - target) ** 2).mean().item()
    ref = ce / n_tok + args.pose_nll_weight * nll / n_pose + 0.5 * l2 / n_pose
    assert abs(loss.item() - ref) < 1e-4 * max(1.0, abs(ref))
    assert abs(stats["losses/ce"] - ce / n_tok) < 1e-5


def test_nll_fits_the_covariance_around_the_regressed_mean():
    """Default pose loss: the NLL's gradient reaches the covariance exactly as a plain NLL's does,
    and the mean only through the L2 on 6D; `--nll_trains_mean` restores the plain NLL."""
    torch.manual_seed(0)
    head = model.GaussianPoseHead(16, rank=2)
    h, target, valid = torch.randn(5, 16), torch.randn(5, 144), torch.tensor([True, True, False, True, True])

    def grads(args):
        mean, log_std, factor = [x.detach().requires_grad_() for x in head(h)]
        nll, l2 = train_sft.pose_loss(model.gaussian(mean, log_std, factor), target, valid, args, 4.0)
        return torch.autograd.grad(nll + l2, (mean, log_std, factor))

    g_mean, g_std, g_factor = grads(train_sft.Args(l2_6d_weight=0.0))
    assert g_mean.abs().max() == 0 and g_std.abs().max() > 0
    f_mean, f_std, f_factor = grads(train_sft.Args(l2_6d_weight=0.0, nll_trains_mean=True))
    assert f_mean.abs().max() > 0
    assert torch.allclose(g_std, f_std) and torch.allclose(g_factor, f_factor)
    l_mean, _, _ = grads(train_sft.Args(l2_6d_weight=1.0))
    mean = head(h)[0].detach()
    ref = 2 * (mean - target) / 144 * valid[:, None] / 4.0  # d/d mean of sum_valid mean_P (mean - p)^2 / n
    assert torch.allclose(l_mean, ref, atol=1e-6)


def test_head_fit_standardisation_folds_exactly():
    """fit_head trains the head on standardised states z = (h - shift) / scale: the first layers are
    re-expressed for z (the same function) and folded back for h after (the same function again)."""
    torch.manual_seed(0)
    head = model.GaussianPoseHead(16, rank=2, mlp_hidden=24)
    assert head.mlp[0].out_features == 24 and head.cov_mlp[0].out_features == 24
    h = torch.randn(7, 16) * 3 + 5
    shift, scale = h.mean(0), h.std(0)
    before = [x.detach().clone() for x in head(h)]
    firsts = [head.mlp[0], head.cov_mlp[0]]
    train_sft.fold_standardisation(firsts, shift, scale, into=True)
    for a, b in zip(head((h - shift) / scale), before):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # a step of the fit, in standardised coordinates
        head.mlp[0].weight.add_(0.01 * torch.randn_like(head.mlp[0].weight))
    fitted = [x.detach().clone() for x in head((h - shift) / scale)]
    train_sft.fold_standardisation(firsts, shift, scale, into=False)
    for a, b in zip(head(h), fitted):
        assert torch.allclose(a, b, atol=1e-5)
    lin = head.mlp[0]  # by hand, one row: W h + b
    assert torch.allclose(lin(h)[:, 3], h @ lin.weight[3] + lin.bias[3], atol=1e-5)


def test_head_fit_loss_matches_slow_reference():
    """The head fit's loss: the SFT pose loss + weight x the mean squared joint distance of the head's
    mean, pelvis-relative, written here one pose and one joint at a time through the full forward."""
    torch.manual_seed(0)
    bm = body.BodyModel()
    head = model.GaussianPoseHead(16, rank=2, mlp_hidden=24)
    dist = head.distribution(torch.randn(3, 16))
    target = body.matrix_to_rot6d(body.axis_angle_to_matrix(0.5 * torch.randn(3, 24, 3))).reshape(3, 144)
    tj = bm.forward_rot6d(target).joints
    tj = tj - tj[:, :1]
    args = train_sft.Args(out_dir="x", head_fit_joints_weight=2.5)
    loss, stats = train_sft.head_fit_loss(dist, target, tj, args, bm)
    nll, l2_6d = train_sft.pose_loss(dist, target, torch.ones(3, dtype=torch.bool), args, 3)
    j = bm.forward_rot6d(dist.mean).joints
    sq = [sum(((j[b, k] - j[b, 0]) - tj[b, k]).pow(2).sum() for k in range(24)) / 24 for b in range(3)]
    assert torch.allclose(loss, nll + l2_6d + 2.5 * sum(sq) / 3, atol=1e-6)
    assert stats["head_fit/l2_joints"] == pytest.approx((sum(sq) / 3).item(), rel=1e-5)
    args.head_fit_joints_weight = 0.0
    assert torch.allclose(train_sft.head_fit_loss(dist, target, None, args, bm)[0], nll + l2_6d)


def test_cosine_schedule():
    lrs = [plumbing.cosine_lr(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[-1] < 0.01


def test_smoke_run_and_exact_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out = run(TINY_RUN + ["--out_dir", str(a)])
    assert "SFT done" in out and "answer format valid" in out and "mean training pose" in out
    assert (a / "LATEST").read_text() == "step-000004" and (a / "test_metrics.json").exists()
    metrics = (a / "metrics.jsonl").read_text()
    assert "stage0/val/pose_vit_mpjpe_mm" in metrics and "losses/ce" in metrics and "head_fit/l2_joints" in metrics
    shutil.copytree(a / "base", b / "base")  # same initial model; stage 0 is skipped
    (b / "metrics.jsonl").write_text('{"step": 1, "from": "a run that saved nothing"}\n')
    run(TINY_RUN + ["--out_dir", str(b), "--stop_after", "2"])
    assert (b / "LATEST").read_text() == "step-000002"
    assert "saved nothing" in (b / "metrics.jsonl.1").read_text()
    assert "saved nothing" not in (b / "metrics.jsonl").read_text()
    r = subprocess.run([sys.executable, "train_sft.py", *TINY_RUN, "--out_dir", str(b)], cwd=ROOT, capture_output=True,
                       text=True)  # a new run where one is held: refused, nothing lost
    assert r.returncode != 0 and "holds a run (checkpoint step-000002): pass --resume" in r.stderr
    run(TINY_RUN + ["--out_dir", str(b), "--resume"])
    wa = load_file(str(a / "step-000004" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "step-000004" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_ddp_gradients_equal_one_process(tmp_path, tok):
    torch.manual_seed(0)
    m = presets.build_tiny(tok)
    presets.save_base(m, tok, str(tmp_path / "run" / "base"), "tiny")
    policy = presets.apply_lora(copy.deepcopy(m))
    with torch.no_grad():  # LoRA B starts at zero: give it values so every gradient is non-trivial
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    policy.save_pretrained(str(tmp_path / "run" / "step-000000" / "adapter"))
    (tmp_path / "run" / "LATEST").write_text("step-000000")
    worker = os.path.join(ROOT, "tests", "ddp_grad_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # both runs on CPU (2 processes under gloo), also where a GPU is
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r = subprocess.run([sys.executable, worker, str(tmp_path / "run"), str(one)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        worker, str(tmp_path / "run"), str(two)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k
    assert any(g.abs().sum() > 0 for g in g1.values())


def test_torchrun_run_evaluates_the_model_it_saves(tmp_path):
    """train_sft.py under torchrun (2 processes, gloo): the head is fitted on rank 0 after stage 1;
    the test metrics at the end, computed over both ranks' shards, must be the saved checkpoint's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29525",
                        "train_sft.py", *TINY_RUN, "--out_dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    logged = json.loads((out / "test_metrics.json").read_text())
    policy, tokenizer, _ = presets.load_policy(str(out), "tiny")
    again = evaluate_policy(policy.eval(), tokenizer, data.PoseBenchTasks("test", CFG, seed=0),
                            posebench.load_split("train", CFG), body.BodyModel(), "cpu", 16, n_generate=4)
    for k in ("image_to_pose/mpjpe_mm", "image_to_pose/pa_mpjpe_mm", "text_to_pose/mpjpe_mm"):
        assert logged[k] == pytest.approx(again[k], rel=1e-4), k


def test_bad_arguments_are_named(tmp_path):
    r = subprocess.run([sys.executable, "train_sft.py", "--preset", "huge", "--out_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--preset huge" in r.stderr
    r = subprocess.run([sys.executable, "train_sft.py", "--resume", "--out_dir", str(tmp_path / "none")] + TINY_RUN,
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no checkpoint to resume from" in r.stderr
    r = subprocess.run([sys.executable, "train_sft.py", "--l2_6d_weight", "0", "--out_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "leaves the pose head's mean untrained" in r.stderr


# ---- stage 0: the pose encoder's pretraining, its cache, the LM's texts ---------------------------

STAGE0 = dict(stage0_pose_epochs=10, stage0_clip_epochs=1, stage0_lm_steps=2, stage0_batch=16)


def test_stage0_pose_vit_loss_falls(tok):
    torch.manual_seed(0)
    base = presets.build_tiny(tok)
    args = train_sft.Args(**STAGE0)
    train, val = posebench.load_split("train", CFG), posebench.load_split("val", CFG)
    res, losses = stage0.pose_vit(base, train, {"val": val}, args, "cpu", lambda m: None)
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert res["stage0/val/pose_vit_mpjpe_mm"] > 0 and "stage0/val/mean_pose_pa_mpjpe_mm" in res
    assert 0 <= res["stage0/val/pose_vit_root_error_deg"] <= 180  # the 6D readout's root orientation


def test_stage0_is_cached_and_invalidated(tok, capsys):
    """One training per key: a second call reads the cache (same weights); another benchmark or
    another encoder configuration trains anew."""
    def call(cfg, **kw):
        tokenizer = vocab.tiny_tokenizer(cfg)
        base = presets.build_tiny(tokenizer, deterministic=kw.pop("deterministic", False))
        args = train_sft.Args(**{**STAGE0, **kw})
        stage0.pretrain(base, lambda: presets.build_tiny(tokenizer), tokenizer, cfg, args, "cpu", lambda m: None)
        return capsys.readouterr().out, base.model.pose_tower.state_dict()

    out, w1 = call(CFG)
    assert "stage 0: trained" in out
    out, w2 = call(CFG, deterministic=True)  # the SFT baseline's base shares its seed's stage 0
    assert "found in the cache" in out and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert "stage 0: trained" in call(posebench.BenchConfig(n_train=40, n_val=16, n_test=40))[0]  # another benchmark
    assert "stage 0: trained" in call(CFG, stage0_readout="flatten")[0]  # another encoder recipe
    assert "stage 0: trained" in call(CFG, seed=1)[0]
    old = presets.TINY["pose_vit"]
    try:  # another encoder architecture
        presets.TINY["pose_vit"] = {**old, "conv_stem": (16, 32, 64)}
        assert "stage 0: trained" in call(CFG)[0]
    finally:
        presets.TINY["pose_vit"] = old


def test_stage0_lm_reads_no_val_or_test_caption():
    texts = set(stage0.lm_texts(CFG))
    prompts = lambda captions: {data.fill_template(p, caption=c) for p in data.PROMPTS["text_to_pose"]  # noqa: E731
                                for c in captions}
    train = {c for cs in posebench.load_split("train", CFG).captions for c in cs}
    assert prompts(train) <= texts  # every training caption, in every prompt
    for split in ("val", "test"):
        held_out = {c for cs in posebench.load_split(split, CFG).captions for c in cs} - train
        assert held_out and not prompts(held_out) & texts, split


# ---- nothing lost, nothing silent (docs/TRAINING.md, "Reliability") -------------------------------------

def adapter_is_finite(step_dir):
    weights = load_file(str(step_dir / "adapter" / "adapter_model.safetensors"))
    return all(torch.isfinite(t).all() for t in weights.values())


def test_a_diverging_run_stops_with_latest_on_finite_weights(tmp_path):
    """--lr 1e6: the gradients go NaN at step 2; those steps are skipped (weights unchanged), the run stops
    after --max_bad_steps of them naming the last good checkpoint, and LATEST holds finite weights."""
    out = tmp_path / "lr"
    r = subprocess.run([sys.executable, "train_sft.py", *TINY_RUN, "--lr", "1e6", "--save_every", "1",
                        "--max_bad_steps",
                        "2", "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "aborting: 2 consecutive steps with NaN/inf gradients (step 3)" in r.stderr
    assert f"the last good checkpoint is {out / 'step-000002'}" in r.stderr and "lower --lr (now 1000000.0)" in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped/nonfinite_gradient"] for x in rows if "skipped/nonfinite_gradient" in x] == [1, 2]
    assert (out / "LATEST").read_text() == "step-000002" and adapter_is_finite(out / "step-000002")


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"), (["--lr", "nan"], "--lr nan: not a finite number"),
    (["--threads", "0"], "--threads 0: must be >= 1"), (["--steps", "-1"], "--steps -1: must be >= 1"),
    (["--mix", "1", "1"], "--mix 1.0 1.0: expected 3 non-negative weights"),
    (["--smpl_path", "nowhere.pkl"], "--smpl_path nowhere.pkl: not found")])
def test_flags_are_checked_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        train_sft.main([*TINY_RUN, "--out_dir", str(tmp_path / "run"), *flags])
    assert message in str(e.value.code)
    assert not (tmp_path / "run").exists()  # nothing written, no stage 0
    with pytest.raises(SystemExit, match=r"--out_dir /proc/x: cannot write there"):
        train_sft.main([*TINY_RUN, "--out_dir", "/proc/x"])


def test_resume_over_a_damaged_latest_step_goes_on_from_the_intact_one(tmp_path):
    """A truncated adapter of the latest step: --resume says so, goes on from the step before and ends
    where the uninterrupted run does; --resume --steps below the checkpoint's step is refused."""
    a = tmp_path / "a"
    run(TINY_RUN + ["--out_dir", str(a), "--save_every", "2", "--eval_samples", "0"])
    b = tmp_path / "b"
    shutil.copytree(a, b)
    path = b / "step-000004" / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    out = run(TINY_RUN + ["--out_dir", str(b), "--resume", "--eval_samples", "0"])
    assert "its latest checkpoint step-000004 is damaged" in out and "resuming from step-000002" in out
    wa, wb = (load_file(str(d / "step-000004" / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    r = subprocess.run([sys.executable, "train_sft.py", *TINY_RUN, "--out_dir", str(b), "--resume", "--steps", "3"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "the checkpoint is at step 4, past --steps 3" in r.stderr
    assert "Traceback" not in r.stderr


def test_base_built_with_other_flags_is_refused(tmp_path):
    """A base/ left by an earlier run (say one that failed after stage 0) is used only by a run with
    the same shaping flags; otherwise the run stops and names them."""
    base = tmp_path / "base"
    base.mkdir()
    args = train_sft.Args()
    built = train_sft.base_flags(args)
    (base / train_sft.BASE_FLAGS).write_text(json.dumps(built))
    train_sft.check_base_flags(str(base), train_sft.base_flags(train_sft.Args()))  # the same flags: used
    with pytest.raises(SystemExit, match=r"--deterministic_head False -> True.*delete"):
        train_sft.check_base_flags(str(base), train_sft.base_flags(train_sft.Args(deterministic_head=True)))
    with pytest.raises(SystemExit, match="--stage0_pose_epochs 8.0 -> 2.0"):
        train_sft.check_base_flags(str(base), train_sft.base_flags(train_sft.Args(stage0_pose_epochs=2.0)))
    (base / train_sft.BASE_FLAGS).write_text("{not json")
    with pytest.raises(SystemExit, match="without a readable built_by.json"):
        train_sft.check_base_flags(str(base), built)


def test_stage0_parts_with_no_steps_leave_the_model_as_it_is(tok):
    """--stage0_clip_epochs 0 and --stage0_lm_steps 0 skip those parts (they crashed on an unbound loss)."""
    torch.manual_seed(0)
    base = presets.build_tiny(tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    args = train_sft.Args(**{**STAGE0, "stage0_clip_epochs": 0.0, "stage0_lm_steps": 0})
    logged = []
    stage0.clip(base, posebench.load_split("train", CFG), tok, args, "cpu", logged.append)
    stage0.lm(base, tok, CFG, args, "cpu", logged.append)
    assert logged == [] and all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

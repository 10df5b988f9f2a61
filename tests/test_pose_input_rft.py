"""HyGRPO on the pose-input tasks: their rewards (format, R_caption, R_posecode, Eq. 7
against B) in rewards.score, one HyGRPO step per task, and their evaluation."""
import numpy as np
import pytest
import torch

import body
import data
import evaluate_tasks
import hygrpo
import model
import posebench
import posecodes
import presets
import rewards
import rollout
import train_rft
import vocab

CFG = posebench.BenchConfig(n_train=48, n_val=40, n_test=40, image_size=32)


class FakeRetriever:
    """cos(phi_t, phi_p) with phi_t = a word-count vector and phi_p = a fixed linear map of the pose."""
    device = "cpu"

    def __init__(self, dim=8):
        g = torch.Generator().manual_seed(0)
        self.words = {}
        self.proj = torch.randn(model.POSE_DIM, dim, generator=g)
        self.dim = dim

    def embed_text(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in data.normalize_text(t).split():
                out[i, hash(w) % self.dim] += 1.0
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)

    def embed_pose(self, pose):
        return torch.nn.functional.normalize(pose.reshape(len(pose), -1).float() @ self.proj, dim=-1)


def force_answer(ids):
    """A logits processor for model.sample making the new tokens begin with `ids` (then anything)."""
    def process(t, logits):
        if t < len(ids):
            logits = torch.full_like(logits, -1e9)
            logits[:, ids[t]] = 0
        return logits
    return process


class NoSimilarity:
    def __call__(self, a, b):
        raise AssertionError("Eq. 10 must not score the pose-input tasks")


@pytest.fixture(scope="module")
def tasks():
    return data.PoseBenchTasks("train", CFG, tasks=data.ALL_TASKS, mix=(0, 0, 0, 1, 1), length=200, seed=0)


def rollout_of(samples, texts, poses):
    n = len(samples)
    return rollout.Rollout(sequences=None, attention_mask=None, completion_mask=None, pixel_values=None,
                           prompt_len=0, pose_pos=torch.full((n,), 30), has_pose=torch.tensor(
                                 [s.task == "pose_edit" for s in samples]),
                           pose=torch.as_tensor(np.stack([np.reshape(p, -1) for p in poses])).float(), texts=texts)


def test_score_of_the_pose_input_tasks(tasks):
    d = tasks.data
    describe = next(tasks[i] for i in range(100)
                    if tasks[i].task == "pose_to_text" and posecodes.stated_codes(tasks[i].answer))
    edit = next(tasks[i] for i in range(100) if tasks[i].task == "pose_edit")
    samples = [describe, describe, describe, edit, edit]
    bm = body.BodyModel()
    retriever = FakeRetriever()
    texts = [describe.answer, "Nothing of the kind", "The " + " and ".join(
        posecodes.CODE_TEXT[c][0][0] for c in posecodes.CODE_NAMES
        if not d.codes[describe.index, posecodes.CODE_NAMES.index(c)])[:3] + ".",
             data.POSE_ANSWER, data.POSE_ANSWER]
    zeros = np.zeros(model.POSE_DIM, np.float32)
    poses = [zeros, zeros, zeros, edit.pose6d, edit.pose_input]  # the true B, then A unchanged
    r, r_d, r_c, valid, where = rewards.score(rollout_of(samples, texts, poses), samples, NoSimilarity(), retriever,
                                              bm, train_rft.Args())
    assert valid.tolist() == [False, False, False, True, True]
    assert r["format"].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]  # "Nothing of the kind" is no sentence
    want = rewards.semantic_reward(texts[:3], torch.as_tensor(describe.pose_input).reshape(1, -1).repeat(3, 1),
                                   retriever)
    assert torch.allclose(r["caption"][:3], want) and r["caption"][3:].abs().sum() == 0
    assert r["posecode"][0] == 1.0 and r["posecode"][1] == 0.0 and r["posecode"][2] == 0.0
    assert r["posecode"][3] == 1.0 and r["posecode"][4] == 0.0  # the instruction's codes: true of B, false of A
    assert r["joint"][3] > 50 and 0 < r["joint"][4] < r["joint"][3]  # Eq. 7 against B
    assert r["text"].abs().sum() == 0 and r["semantic"].abs().sum() == 0
    assert torch.allclose(r_d, r["format"] + r["caption"] + torch.tensor([1.0, 0, 0, 0, 0]) * r["posecode"])
    assert torch.allclose(r_c[3:], r["joint"][3:] + r["posecode"][3:])
    assert where["caption"].tolist() == [True] * 3 + [False] * 2 and where["posecode"].all()
    assert where["joint"].tolist() == [False] * 3 + [True] * 2


def test_posecode_reward_against_a_loop():
    rng = np.random.default_rng(0)
    codes = rng.random((6, len(posecodes.CODE_NAMES))) < 0.4
    stated = [list(rng.choice(posecodes.CODE_NAMES, size=k, replace=False)) for k in (0, 1, 2, 3, 4, 2)]
    slow = [sum(codes[i, list(posecodes.CODE_NAMES).index(c)] for c in s) / len(s) if s else 0.0 for i,
            s in enumerate(stated)]
    assert torch.allclose(rewards.posecode_reward(stated, codes), torch.tensor(slow, dtype=torch.float32))
    assert rewards.format_reward(["The left knee is bent.", "bent", "The <POSE>."],
                                 ["pose_to_text"] * 3).tolist() == [1, 0,
                                                                    0]


@pytest.mark.parametrize("task", ["pose_to_text", "pose_edit"])
def test_one_hygrpo_step_per_task_trains_the_pose_encoder(tasks, task, monkeypatch):
    tok = vocab.tiny_tokenizer(CFG, pose_input=True)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok, image_size=32))
    names, params = train_rft.checkpoint.trainable_params(policy)
    assert any("pose_input_encoder" in n for n in names)
    B, G = 2, 4
    args = train_rft.Args(max_new_tokens=10, pose_temperature=1.0, group_size=G)
    ctx = train_rft.StepContext(policy, tok, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), params,
                                NoSimilarity(), FakeRetriever(), body.BodyModel(), hygrpo.make_loss(False),
                                rollout.suppressed_tokens(policy, tok))
    if task == "pose_edit":  # a random policy seldom says <POSE>: force the pose answer, so the poses are scored
        answer = tok(" " + data.POSE_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        sample = model.sample
        monkeypatch.setattr(model, "sample", lambda *a, **kw: sample(*a, **kw, logits_processor=force_answer(answer)))
    enc = policy.get_base_model().model.pose_input_encoder
    before = [p.detach().clone() for p in enc.parameters()]
    samples = [s for s in (tasks[i] for i in range(100)) if s.task == task][:2]
    rec = train_rft.hygrpo_step(ctx, [s for s in samples for _ in range(G)], B, G, args)
    assert "skipped" not in rec, rec
    assert rec["rewards/posecode"] is not None
    if task == "pose_to_text":
        assert rec["rewards/caption"] is not None and rec["charts/frac_valid_pose"] == 0
    else:  # every sample in V, scored by Eq. 7 against B: the continuous branch
        assert rec["charts/frac_valid_pose"] == 1.0 and rec["rewards/joint"] > 0 and rec["losses/pg_continuous"] != 0
    assert any(not torch.equal(a, b) for a, b in zip(before, enc.parameters()))  # no weight decay: by the gradient


def test_evaluation_of_the_pose_input_tasks(tasks):
    tok = vocab.tiny_tokenizer(CFG, pose_input=True)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok, image_size=32)).eval()
    val = data.PoseBenchTasks("val", CFG)
    res, preds = evaluate_tasks.pose_input_metrics(policy, tok, val, body.BodyModel(), "cpu", 40, 32,
                                                   {"eval": FakeRetriever()}, batch_size=16)
    assert len(preds["answers"]["pose_to_text"]) == 32 and len(preds["pose_edit"]["index"]) == min(40, len(val.edits))
    for k in ("pose_to_text/eval_retriever/R-precision@1", "pose_to_text/eval_retriever/reference_R-precision@3",
              "pose_to_text/bleu4", "pose_to_text/rouge_l", "pose_edit/mpjpe_mm", "pose_edit/copy_a_mpjpe_mm",
              "pose_edit/eval_retriever/R@10", "pose_edit/eval_retriever/copy_a_R@1"):
        assert res[k] is not None and np.isfinite(res[k]), k
    # the copy-A control, by hand
    s = val.eval_samples("pose_edit")[:40]
    from metrics import mpjpe_mm
    gt = torch.as_tensor(val.data.joints[[x.index for x in s]])
    a = torch.as_tensor(val.data.joints[[x.source_index for x in s]])
    assert res["pose_edit/copy_a_mpjpe_mm"] == pytest.approx(mpjpe_mm(a, gt).mean().item())


def test_sft_and_rft_runs_with_the_pose_input_tasks(tmp_path, capsys):
    """SFT with --mix of 5 weights shares the default run's stage 0 (one cache entry), evaluates the new
    tasks; RFT trains on them from that SFT run."""
    import json

    import retrieval
    import train_sft
    from test_train_sft import TINY_RUN
    bench = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]
    train_sft.main(TINY_RUN + ["--out_dir", str(tmp_path / "sft_default")])
    capsys.readouterr()
    five = ["--mix", "0.2", "0.2", "0.2", "0.2", "0.2"]
    train_sft.main(TINY_RUN + five + ["--out_dir", str(tmp_path / "sft")])
    assert "stage 0: found in the cache" in capsys.readouterr().out
    with open(tmp_path / "sft" / "test_metrics.json") as fh:
        res = json.load(fh)
    assert res["pose_edit/copy_a_mpjpe_mm"] > 0 and np.isfinite(res["pose_edit/mpjpe_mm"])
    assert "pose_to_text/bleu4" in res and "image_to_pose/mpjpe_mm" in res
    with open(tmp_path / "sft" / "base" / train_sft.BASE_FLAGS) as fh:
        assert json.load(fh)["pose_input"] is True
    import posebench
    from tools import edit_probe  # does the run read A? (tools/edit_probe.py)

    got = edit_probe.probe(str(tmp_path / "sft"), "test", 8, posebench.BenchConfig(n_train=48, n_val=16, n_test=40))
    assert all(np.isfinite(v) and v > 0 for v in got.values())
    retrieval.main(bench + ["--epochs", "1", "--embed_dim", "16", "--hidden_dim", "32", "--batch_size", "16",
                            "--out_dir", str(tmp_path), "--num_threads", "1"])
    train_rft.main(bench + five + ["--steps", "2", "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "12",
                                   "--log_every", "1", "--eval_samples", "16", "--eval_generate", "4", "--threads", "1",
                                   "--warmup_steps", "1", "--sft_dir", str(tmp_path / "sft"), "--out_dir",
                                   str(tmp_path / "rft"), "--reward_retriever", str(tmp_path / "retriever_reward"),
                                   "--eval_retriever", str(tmp_path / "retriever_eval")])
    rows = [json.loads(x) for x in open(tmp_path / "rft" / "metrics.jsonl")]
    assert any("pose_edit/mpjpe_mm" in k for r in rows for k in r)

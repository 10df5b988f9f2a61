"""The abstract-prompt task (CoT-Pose, issue 22): its samples and vocabulary, its rewards and metrics on
hand-made cases, and that the pose is read at <POSE> after the policy's own generated reasoning, in
evaluation and in RFT (never teacher-forced with the reference's)."""
import numpy as np
import pytest
import torch

import body
import data
import evaluate
import evaluate_tasks
import metrics
import model
import posebench
import posecodes
import presets
import rewards
import rollout
import train_rft
import vocab
from test_pose_input_rft import force_answer

CFG = posebench.BenchConfig(n_train=200, n_val=40, n_test=80, image_size=32)
TASK = data.ABSTRACT_TASK


@pytest.fixture(scope="module")
def tasks():
    return data.PoseBenchTasks("train", CFG, tasks=data.MIX_TASKS, mix=(0, 0, 0, 0, 0, 1), length=300, seed=0)


class FakeRetriever:
    """cos(phi_t, phi_p): phi_t a word-count vector, phi_p a fixed linear map of the pose."""
    device = "cpu"

    def __init__(self, dim=8):
        self.proj = torch.randn(model.POSE_DIM, dim, generator=torch.Generator().manual_seed(0))
        self.dim = dim

    def embed_text(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in data.normalize_text(t).split():
                out[i, sum(map(ord, w)) % self.dim] += 1.0
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)

    def embed_pose(self, pose):
        return torch.nn.functional.normalize(pose.reshape(len(pose), -1).float() @ self.proj, dim=-1)


def test_samples_answer_with_a_caption_of_their_pose_then_the_pose(tasks):
    d = tasks.data
    for i in range(40):
        s = tasks[i]
        assert s.task == TASK and s.archetype == d.archetype[s.index]
        assert s.text in posebench.ARCHETYPE_PHRASES[posebench.ARCHETYPE_NAMES[s.archetype]] and s.text in s.prompt
        caption = data.reasoning_of(s.answer)
        assert caption in d.captions[s.index] and s.answer == f"{caption} {data.POSE_ANSWER}"
        assert np.array_equal(s.joints, d.joints[s.index])  # canonical, as text-to-pose
    control = data.PoseBenchTasks("train", CFG, tasks=data.MIX_TASKS, mix=(0, 0, 0, 0, 0, 1), length=300, seed=0,
                                  reasoning=False)
    assert control[3].answer == data.POSE_ANSWER and control[3].prompt == tasks[3].prompt
    ev = data.PoseBenchTasks("test", CFG).eval_samples(TASK)
    assert len(ev) == 3 * len(np.unique(data.PoseBenchTasks("test", CFG).data.archetype))
    assert len({s.prompt for s in ev}) == len(ev)
    # the default mixture draws what it drew before (the abstract task's extra draw is its own)
    a, b = data.PoseBenchTasks("train", CFG, length=50), data.PoseBenchTasks("train", CFG, length=50, reasoning=False)
    assert all(a[i].prompt == b[i].prompt and a[i].index == b[i].index for i in range(50))


def test_the_abstract_vocabulary_extends_the_pose_input_one(tasks):
    small, mid, big = (vocab.tiny_tokenizer(CFG), vocab.tiny_tokenizer(CFG, pose_input=True),
                       vocab.tiny_tokenizer(CFG, abstract=True))
    assert len(small) < len(mid) < len(big)
    words = big.get_vocab()
    assert all(words[w] == i for w, i in mid.get_vocab().items())  # every smaller id keeps its meaning
    ids = big(tasks[0].prompt + " " + tasks[0].answer, add_special_tokens=False)["input_ids"]
    assert big.unk_token_id not in ids
    b = data.collate([tasks[i] for i in range(4)], big, 2)
    assert (b.pose_token_pos > 0).all() and b.pose_valid.all()


def test_reasoning_of_and_the_format_reward():
    good = "The left knee is bent, the torso is upright . The SMPL pose of this person is <POSE> ."
    assert data.reasoning_of(good) == "The left knee is bent, the torso is upright ."
    assert data.reasoning_of(data.POSE_ANSWER) == "" and data.reasoning_of("no pose here") == "no pose here"
    ref, control = data.abstract_answer("The left knee is bent."), data.abstract_answer("x", reasoning=False)
    texts = [good, data.POSE_ANSWER, "The left knee is bent.", good + " More.", data.POSE_ANSWER, good]
    refs = [ref, ref, ref, ref, control, control]
    assert rewards.format_reward(texts, [TASK] * 6, refs).tolist() == [1, 0, 0, 0, 1, 0]


def test_plausibility_reward_by_hand():
    A, C = len(posebench.ARCHETYPE_NAMES), len(posecodes.CODE_NAMES)
    table = np.zeros((A, C), bool)
    col = {c: i for i, c in enumerate(posecodes.CODE_NAMES)}
    table[3, col["upright"]] = table[3, col["left_knee_bent"]] = True  # plausible for archetype 3
    stated = [["upright", "left_knee_bent"], ["upright", "lying"], ["lying"], [], ["upright"]]
    r = rewards.plausibility_reward(stated, [3, 3, 3, 3, 0], table)
    assert r.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]
    # the table from a split: a code true of every kneeling pose is plausible for kneeling
    split = posebench.load_split("train", CFG)
    freq = posebench.archetype_code_freq(split)
    a = posebench.ARCHETYPE_NAMES.index("kneeling")
    rows = split.codes[split.archetype == a]
    assert np.allclose(freq[a], rows.mean(0)) and freq.shape == (A, C)
    with pytest.raises(ValueError):
        rewards.plausibility_reward([["upright"]], [0, 1], table)


def rollout_of(samples, texts, poses, has_pose):
    n = len(samples)
    return rollout.Rollout(sequences=None, attention_mask=None, completion_mask=None, pixel_values=None,
                           prompt_len=0, pose_pos=torch.full((n,), 30), has_pose=torch.tensor(has_pose),
                           pose=torch.as_tensor(np.stack([np.reshape(p, -1) for p in poses])).float(), texts=texts)


def test_score_of_the_abstract_task_by_hand(tasks):
    d = tasks.data
    s = tasks[0]
    control = data.PoseBenchTasks("train", CFG, tasks=data.MIX_TASKS, mix=(0, 0, 0, 0, 0, 1), length=300, seed=0,
                                  reasoning=False)[0]
    true = [c for c in posecodes.CODE_NAMES if d.codes[s.index, posecodes.CODE_NAMES.index(c)]]
    false = [c for c in posecodes.CODE_NAMES if not d.codes[s.index, posecodes.CODE_NAMES.index(c)]]
    # one true, one false
    both = posecodes.join_clauses([posecodes.CODE_TEXT[true[0]][0][0], posecodes.CODE_TEXT[false[0]][0][0]])
    texts = [f"{both} {data.POSE_ANSWER}", f"{both} {data.POSE_ANSWER}", "Nothing.", data.POSE_ANSWER]
    samples = [s, s, s, control]
    poses = [s.pose6d, s.pose6d, s.pose6d, s.pose6d]
    stats = rewards.ArchetypeStats(d)
    ret = FakeRetriever()
    r, r_d, r_c, valid, where = rewards.score(rollout_of(samples, texts, poses, [True, False, True, True]), samples,
                                              None, ret, body.BodyModel(), train_rft.Args(), archetypes=stats)
    assert valid.tolist() == [True, False, True, True]
    assert r["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    plaus = stats.plausible[s.archetype]
    want = np.mean([plaus[posecodes.CODE_NAMES.index(true[0])], plaus[posecodes.CODE_NAMES.index(false[0])]])
    assert r["plausible"][0].item() == pytest.approx(want) and r["plausible"][2] == 0 and r["plausible"][3] == 0
    # the pose of row 0 is the pose the caption's codes were measured on: one of the two stated codes is true
    assert r["posecode"][0].item() == pytest.approx(0.5) and r["posecode"][1] == 0  # row 1 has no pose: unscored
    sem = rewards.semantic_reward([both], torch.as_tensor(s.pose6d).reshape(1, -1), ret)
    assert r["reasoning"][0].item() == pytest.approx(sem.item()) and r["reasoning"][1] == 0
    proto = stats.prototypes(ret)[s.archetype]
    arch = (proto * ret.embed_pose(torch.as_tensor(s.pose6d).reshape(1, -1))[0]).sum()
    assert r["archetype"][3].item() == pytest.approx(arch.item()) and r["archetype"][:3].abs().sum() == 0
    assert r_d.tolist() == pytest.approx((r["format"] + r["plausible"]).tolist())
    assert r_c[0].item() == pytest.approx(r["reasoning"][0].item() + 0.5)
    assert r_c[3].item() == pytest.approx(arch.item())
    assert where["plausible"].tolist() == [True, True, True, False] and where["archetype"].tolist() == [0, 0, 0, 1]
    assert where["reasoning"].tolist() == [True, False, True, False] and r["text"].abs().sum() == 0


def test_prototypes_by_hand():
    split = posebench.load_split("train", CFG)
    stats = rewards.ArchetypeStats(split, per_archetype=5)
    ret = FakeRetriever()
    a = int(split.archetype[0])
    rows = np.flatnonzero(split.archetype == a)[:5]
    mean = ret.embed_text([split.captions[i][0] for i in rows]).mean(0)
    assert torch.allclose(stats.prototypes(ret)[a], mean / mean.norm(), atol=1e-6)


def test_nearest_pfd_and_mpjpe_by_hand():
    bm = body.BodyModel()
    split = posebench.load_split("test", CFG)
    cand = torch.as_tensor(data.pose_aa_to_6d(split.pose_aa)).reshape(len(split), -1)
    joints_of = lambda p: (lambda j: j - j[:, :1])(bm.forward_rot6d(p).joints.detach())  # noqa: E731
    ret = FakeRetriever()
    # a candidate itself with another root is at distance 0 (the root is aligned); the wrong group is not searched
    a = int(split.archetype[0])
    other_root = data.pose_aa_to_6d(np.array([[[0.3, 1.0, -0.2]] * 24]))[0, 0]
    q = cand[:1].clone()
    q[0, :6] = torch.as_tensor(other_root)
    assert metrics.nearest_mpjpe_mm(q, [a], cand, split.archetype, joints_of)[0].item() == pytest.approx(0, abs=1e-3)
    assert metrics.nearest_pfd(q, [a], cand, split.archetype, ret.embed_pose)[0].item() == pytest.approx(0, abs=1e-5)
    # against a slow loop: a perturbed pose, the minimum over the group's candidates with their roots
    g = torch.Generator().manual_seed(0)
    q = cand[:3] + 0.3 * torch.randn(3, cand.shape[1], generator=g)
    groups = [int(x) for x in split.archetype[:3]]
    slow_m, slow_p = [], []
    for i, grp in enumerate(groups):
        best_m = best_p = float("inf")
        for j in np.flatnonzero(split.archetype == grp):
            aligned = torch.cat([cand[j, :6], q[i, 6:]])[None]
            jm = (joints_of(aligned) - joints_of(cand[j:j + 1])).norm(dim=-1).mean().item() * 1000
            e1, e2 = ret.embed_pose(aligned)[0], ret.embed_pose(cand[j:j + 1])[0]
            best_m, best_p = min(best_m, jm), min(best_p, (e1 / e1.norm() - e2 / e2.norm()).norm().item())
        slow_m.append(best_m)
        slow_p.append(best_p)
    assert metrics.nearest_mpjpe_mm(q, groups, cand, split.archetype, joints_of).tolist() == pytest.approx(slow_m,
                                                                                                           rel=1e-4)
    assert metrics.nearest_pfd(q, groups, cand, split.archetype, ret.embed_pose).tolist() == pytest.approx(slow_p,
                                                                                                           rel=1e-4)
    assert np.isnan(metrics.nearest_pfd(q[:1], [99], cand, split.archetype, ret.embed_pose)[0].item())  # no candidate


def test_knn_predict_against_a_loop():
    rng = np.random.default_rng(0)
    x, y, q = rng.normal(size=(60, 5)), rng.integers(0, 4, 60), rng.normal(size=(20, 5))
    got = metrics.knn_predict(x, y, q, k=5, chunk=7)
    for i in range(20):
        order = np.argsort(((x - q[i]) ** 2).sum(1), kind="stable")[:5]
        votes = {c: list(y[order]).count(c) for c in set(y[order])}
        top = max(votes.values())
        assert got[i] == next(c for c in y[order] if votes[c] == top)
    assert (metrics.knn_predict(x, y, x, k=1) == y).all()  # each training row is its own nearest


def teacher_forced_mean(policy, tok, sample, answer):
    b = data.collate([data.Sample(sample.task, sample.prompt, answer)], tok, policy.get_base_model().num_image_tokens)
    _, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, None, b.pose_token_pos)
    return dist.mean[0].detach()


def test_the_pose_is_read_after_the_generated_reasoning(tasks, monkeypatch):
    """Evaluation (evaluate_tasks.generate_with_poses, abstract_metrics) and RFT (rollout.rollout) read <POSE>
    after the text the policy generated: forced here to a reasoning other than the reference's, the pose
    is the teacher-forced one of that text, not of the reference."""
    tok = vocab.tiny_tokenizer(CFG, abstract=True)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok, image_size=32)).eval()
    s = tasks[0]
    other = next(c for caps in tasks.data.captions for c in caps if c not in tasks.data.captions[s.index])
    generated = data.abstract_answer(other)
    ids = tok(" " + generated, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *a, **kw: sample(*a, **kw, logits_processor=force_answer(ids)))
    texts, pose, has = evaluate_tasks.generate_with_poses(policy, tok, [s], "cpu")
    assert has.tolist() == [True] and data.normalize_text(texts[0]) == data.normalize_text(generated)
    want, reference = teacher_forced_mean(policy, tok, s, generated), teacher_forced_mean(policy, tok, s, s.answer)
    assert not torch.allclose(want, reference, atol=1e-4)
    assert torch.allclose(pose[0], want, atol=1e-4)
    args = train_rft.Args(max_new_tokens=48, group_size=2, pose_temperature=0.3)
    ro = rollout.rollout(policy, tok, [s, s], args, "cpu")
    assert ro.has_pose.all() and torch.allclose(ro.pose_mean, want[None].expand(2, -1), atol=1e-4)
    # abstract_metrics scores that pose: its consistency is the share of `other`'s codes true of it
    ev = data.PoseBenchTasks("val", CFG)
    res, preds = evaluate_tasks.abstract_metrics(policy, tok, ev, tasks.data, body.BodyModel(), "cpu",
                                                 {"eval": FakeRetriever()})
    n = len(ev.eval_samples(TASK))
    assert len(preds["answers"][TASK]) == n and res[f"{TASK}/pose_rate"] == 1.0 and res[f"{TASK}/format_valid"] == 1.0
    bm = body.BodyModel()
    j = bm.forward_rot6d(want[None]).joints.detach()
    codes = posecodes.posecodes((j - j[:, :1]).double().numpy())
    assert res[f"{TASK}/consistency"] == pytest.approx(rewards.posecode_reward([posecodes.stated_codes(other)],
                                                                               codes).item())
    for k in ("archetype_accuracy", "archetype_accuracy_true_poses", "eval_retriever/pfd", "nearest_mpjpe_mm",
              "eval_retriever/reasoning_similarity", "eval_retriever/archetype_similarity", "plausible"):
        assert res[f"{TASK}/{k}"] is not None and np.isfinite(res[f"{TASK}/{k}"]), k
    # every prompt got the same forced answer, so one pose: the archetype accuracy is the share of prompts of its class
    guess = metrics.knn_predict(tasks.data.joints.reshape(len(tasks.data), -1), tasks.data.archetype,
                                (j - j[:, :1]).reshape(1, -1).double().numpy(), evaluate_tasks.ARCHETYPE_KNN)[0]
    arch = np.array([x.archetype for x in ev.eval_samples(TASK)])
    assert res[f"{TASK}/archetype_accuracy"] == pytest.approx(float((arch == guess).mean()))


def test_sft_rft_and_evaluate_with_the_abstract_task(tmp_path, capsys):
    """SFT with --mix of 6 weights (the default run's stage 0, shared), RFT (HyGRPO) on it with its rewards
    logged, evaluate.py finding the task from the run's flags; RFT refuses a --reasoning other than SFT's
    and too few new tokens for a reasoning."""
    import json

    import retrieval
    import train_sft
    from test_train_sft import TINY_RUN
    bench = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]
    six = ["--mix", "0.2", "0.2", "0.1", "0", "0", "0.5"]
    train_sft.main(TINY_RUN + six + ["--out_dir", str(tmp_path / "sft")])
    with open(tmp_path / "sft" / "test_metrics.json") as fh:
        res = json.load(fh)
    assert res[f"{TASK}/archetype_accuracy_true_poses"] is not None and f"{TASK}/pose_rate" in res
    with open(tmp_path / "sft" / "base" / train_sft.BASE_FLAGS) as fh:
        assert json.load(fh)["abstract"] is True
    retrieval.main(bench + ["--epochs", "1", "--embed_dim", "16", "--hidden_dim", "32", "--batch_size", "16",
                            "--out_dir", str(tmp_path), "--num_threads", "1"])
    rft = bench + ["--mix", "0", "0", "0", "0", "0", "1", "--steps", "2", "--batch_size", "2", "--group_size", "2",
                   "--max_new_tokens", "48",
                   "--log_every", "1", "--eval_samples", "0", "--threads", "1", "--warmup_steps", "1",
                   "--sft_dir", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "rft"),
                   "--reward_retriever", str(tmp_path / "retriever_reward"),
                   "--eval_retriever", str(tmp_path / "retriever_eval")]
    for bad, what in ((["--reasoning", "false"], "--reasoning"), (["--max_new_tokens", "24"], "--max_new_tokens")):
        with pytest.raises(SystemExit, match=what):
            train_rft.main(rft + bad)
    train_rft.main(rft)
    rows = [json.loads(x) for x in open(tmp_path / "rft" / "metrics.jsonl")]
    train = [r for r in rows if "losses/total" in r]
    assert len(train) == 2 and all(r["rewards/plausible"] is not None and "rewards/reasoning" in r for r in train)
    evaluate.main(["--ckpt", str(tmp_path / "rft"), "--eval_samples", "16", "--eval_generate", "2", "--threads", "1",
                   "--reward_retriever", str(tmp_path / "retriever_reward"),
                   "--eval_retriever", str(tmp_path / "retriever_eval"), "--split", "val"])
    with open(tmp_path / "rft" / "eval" / "results.json") as fh:
        got = json.load(fh)["metrics"]
    assert f"{TASK}/eval_retriever/archetype_similarity" in got and f"{TASK}/nearest_mpjpe_mm" in got

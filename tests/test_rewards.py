"""rewards.py on hand-made cases (Eq. 7-10)."""
import pytest
import torch

import body
import data
import metrics
import rewards


def test_joint_reward_by_hand():
    gt = torch.zeros(2, 24, 3)
    pred = torch.zeros(2, 24, 3)
    pred[0, 1:, 0] = 0.1  # every joint but the pelvis 10 cm off: mean distance 23/24 * 0.1 m
    pred[1] += 5.0  # a pure translation: pelvis-centred, so a perfect pose
    r = rewards.joint_reward(pred, gt, eps_m=0.01)
    assert r[0].item() == pytest.approx(1 / (23 / 24 * 0.1 + 0.01), rel=1e-6)
    assert r[1].item() == pytest.approx(100.0, rel=1e-6)
    assert r[1] > r[0]  # closer is better
    with pytest.raises(ValueError, match="pred_joints has shape"):
        rewards.joint_reward(torch.zeros(2, 23, 3), gt)
    bad = pred.clone()
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rewards.joint_reward(bad, gt)


def test_joint_reward_procrustes_ablation():
    """--joint_reward_align procrustes: 1 / (PA-MPJPE in metres + eps), so a rotated, scaled and
    shifted copy of the ground truth is perfect while Eq. 7 penalises it."""
    torch.manual_seed(0)
    gt = 0.3 * torch.randn(3, 24, 3, dtype=torch.float64)
    c, s = 0.6, 0.8
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    pred = gt.clone()
    pred[0] = 1.2 * gt[0] @ R.T + 0.5  # a similarity transform of the truth
    pred[1:] = gt[1:] + 0.05 * torch.randn(2, 24, 3, dtype=torch.float64)
    r = rewards.joint_reward(pred, gt, align="procrustes")
    assert r[0].item() == pytest.approx(100.0, rel=1e-6)
    assert rewards.joint_reward(pred, gt)[0] < 10  # Eq. 7 (pelvis) does see the rotation
    ref = 1 / (metrics.pa_mpjpe_mm(pred, gt) / 1000 + 0.01)  # metrics.pa_mpjpe_mm has its own loop test
    assert torch.allclose(r, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="align='root'"):
        rewards.joint_reward(pred, gt, align="root")


def test_format_reward_by_hand():
    completions = ["The SMPL pose of this person is <POSE> .", "The SMPL pose of this person is <POSE>.",
                   "The SMPL pose of this person is .", "The SMPL pose is <POSE> .", "Yes , the left arm is straight .",
                   "Yes the left arm is straight", "No, the hands are not close together.",
                   "The SMPL pose of this person is <POSE> . <POSE>"]
    tasks = ["image_to_pose", "text_to_pose", "image_to_pose", "text_to_pose", "vqa", "vqa", "vqa", "image_to_pose"]
    assert rewards.format_reward(completions, tasks).tolist() == [1, 1, 0, 0, 1, 0, 1, 0]
    assert rewards.format_reward(["Yes, <POSE>.", "No, .", "Yes, <unk> <unk>."], ["vqa"] * 3).tolist() == [0, 0, 0]
    # a free-form reference (real VQA data): any non-empty answer without special tokens, long or truncated
    refs = ["Yes, the man is wearing a hat.", "The man wears a red hat. It is sunny.", "The man wears a red hat."]
    answers = ["Yes, the man is wearing a hat. It is red.", "A red hat, on a sunny day", "<POSE>"]
    assert rewards.format_reward(answers, ["vqa"] * 3, refs).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="unknown task"):
        rewards.format_reward(["x"], ["dance"])
    with pytest.raises(ValueError, match="2 completions but 1 tasks"):
        rewards.format_reward(["a", "b"], ["vqa"])


def test_format_reward_accepts_every_benchmark_answer():
    import posebench
    tasks = data.PoseBenchTasks("test", posebench.BenchConfig(n_train=48, n_val=16, n_test=40), seed=0)
    samples = [tasks[i] for i in range(40)]
    assert rewards.format_reward([s.answer for s in samples], [s.task for s in samples]).tolist() == [1.0] * 40


@pytest.fixture(scope="module")
def similarity():
    return rewards.TextSimilarity()


def test_text_reward(similarity):
    r = rewards.text_reward(["Yes, the left arm is straight.", "Yes , the left arm is straight .",
                             "No, the feet are not together.", "The SMPL pose of this person is <POSE>."],
                            ["Yes, the left arm is straight."] * 4, similarity)
    assert r[0].item() == pytest.approx(1.0, abs=1e-4) and r[1].item() == pytest.approx(1.0, abs=1e-4)
    assert r[2] < 0.9 and r[3] < r[2]  # a different answer, then an unrelated one
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        rewards.text_reward(["a", "b"], ["a"], similarity)


def test_semantic_reward_is_the_retriever_cosine():
    class Stub:  # a retriever whose embeddings are known
        def embed_text(self, texts):
            return torch.tensor([[1.0, 0.0], [0.0, 2.0]])

        def embed_pose(self, poses):
            return torch.tensor([[3.0, 0.0], [1.0, 1.0]])

    r = rewards.semantic_reward(["a", "b"], torch.zeros(2, 144), Stub())
    assert r.tolist() == pytest.approx([1.0, 2 ** -0.5])
    assert body.NUM_JOINTS * 6 == 144


def test_text_similarity_cache_overflow_starts_again(similarity):
    """When the cache is full it restarts with the call's texts, cached ones included (they were
    looked up after the clear, a KeyError)."""
    small = rewards.TextSimilarity.__new__(rewards.TextSimilarity)
    small.encoder, small.cache, small.cache_size = similarity.encoder, {}, 4
    small.embed(["a", "b", "c"])
    e = small.embed(["a", "d", "e"])
    assert torch.allclose(e, similarity.embed(["a", "d", "e"]), atol=1e-5) and set(small.cache) == {"a", "d", "e"}

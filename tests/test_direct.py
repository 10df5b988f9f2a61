"""train_rft.py --algo direct (DrPose-style direct reward fine-tuning): the loss against autograd of the
reward alone on a one-step case, its KL (zero at the start, weighed as HyGRPO's), and one step of a tiny
policy in which only the pose path learns."""
import numpy as np
import pytest
import torch

import body
import data
import model
import posebench
import presets
import rewards
import rollout
import train_rft
import vocab
from test_abstract import FakeRetriever
from test_pose_input_rft import force_answer

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40, image_size=32)


def head_gaussian(mu, tau=0.3, seed=1):
    """A low-rank Gaussian like the pose head's (fixed spread and factor), tempered by tau."""
    g = torch.Generator().manual_seed(seed)
    N, P = mu.shape
    log_std = torch.full((N, P), -2.0) + 0.3 * torch.randn(N, P, generator=g)
    factor = 0.1 * torch.randn(N, P, 4, generator=g)
    return model.tempered(model.gaussian(mu, log_std, factor), tau)


def rest_poses(n, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    return model.IDENTITY_6D.repeat(model.POSE_DIM // 6)[None].repeat(n, 1) + scale * torch.randn(n, model.POSE_DIM,
                                                                                                  generator=g)


def test_one_step_moves_the_mean_along_the_reward_gradient():
    bm = body.BodyModel()
    B, G = 2, 3
    N = B * G
    gt = bm.forward_rot6d(rest_poses(N, seed=5)).joints.detach()
    mu = torch.nn.Parameter(rest_poses(N))
    dist, ref = head_gaussian(mu), head_gaussian(mu.detach())
    seen = {}

    def reward(p):
        seen["p"] = p.detach().clone()
        return rewards.joint_reward(bm.forward_rot6d(p).joints, gt)

    torch.manual_seed(0)
    loss, stats = train_rft.direct_loss(dist, ref, reward, torch.ones(N, dtype=torch.bool), B, G, beta=0.04)
    assert stats["kl_pose"].item() == pytest.approx(0.0, abs=1e-4)  # pi_theta = pi_ref at the start (float32 logdets)
    loss.backward()
    # the reference: autograd of the reward alone, at the same sample p = mu + tau L eps
    p0 = seen["p"].clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(rewards.joint_reward(bm.forward_rot6d(p0).joints, gt).sum(), p0)
    assert g_ref.abs().sum() > 0
    # the loss is -(1/N) sum_i R(p_i) (all G valid in each group): dp/dmu = I, and the KL adds no gradient at the start
    assert torch.allclose(mu.grad, -g_ref / N, rtol=1e-4, atol=1e-7)
    before = mu.detach().clone()
    torch.optim.SGD([mu], lr=1e-3).step()
    step = mu.detach() - before
    assert torch.allclose(step, 1e-3 * g_ref / N, rtol=1e-3, atol=3e-7)  # float32 rounding of mu + step
    # and the reward at the same noise goes up
    noise = seen["p"] - before
    with torch.no_grad():
        r0 = rewards.joint_reward(bm.forward_rot6d(before + noise).joints, gt).sum()
        r1 = rewards.joint_reward(bm.forward_rot6d(mu.detach() + noise).joints, gt).sum()
    assert r1 > r0


def test_the_sample_is_reparameterised_and_the_root_can_stay_at_the_mean():
    mu = rest_poses(4)
    seen = []
    for shift in (0.0, 0.5):
        torch.manual_seed(3)
        train_rft.direct_loss(head_gaussian(mu + shift), head_gaussian(mu + shift),
                              lambda p: seen.append(p) or p.sum(1),
                              torch.ones(4, dtype=torch.bool), 2, 2, beta=0.0)
    assert torch.allclose(seen[1] - seen[0], torch.full_like(seen[0], 0.5), atol=1e-5)  # p - mu = tau L eps
    torch.manual_seed(3)
    _, stats = train_rft.direct_loss(head_gaussian(mu), head_gaussian(mu), lambda p: p.sum(1),
                                     torch.ones(4, dtype=torch.bool), 2, 2, beta=0.0, explore_root=False)
    assert torch.equal(stats["pose"][:, :model.ROOT_DIMS], mu[:, :model.ROOT_DIMS])
    assert not torch.allclose(stats["pose"][:, model.ROOT_DIMS:], mu[:, model.ROOT_DIMS:])


def test_loss_against_a_loop_with_invalid_rows_and_a_kl():
    """-(mean over prompts with a pose of the mean over their posed samples of R) + beta (the same of KL)."""
    B, G, beta = 3, 2, 0.7
    mu = rest_poses(B * G)
    dist, ref = head_gaussian(mu), head_gaussian(mu + 0.05, seed=2)
    valid = torch.tensor([True, False, False, False, True, True])  # prompt 1 has no pose at all
    torch.manual_seed(4)
    loss, stats = train_rft.direct_loss(dist, ref, lambda p: p[:, 0] * 3.0, valid, B, G, beta)
    p = stats["pose"]
    kl = torch.distributions.kl_divergence(dist, ref)
    terms = []
    for b in range(B):
        rows = [b * G + i for i in range(G) if valid[b * G + i]]
        if rows:
            terms.append(sum(-3.0 * p[i, 0] + beta * kl[i] for i in rows) / len(rows))
    assert loss.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-5)
    assert stats["kl_pose"].item() > 0


def test_differentiable_rewards_equal_hygrpos_and_have_gradients():
    tasks = data.PoseBenchTasks("train", CFG, length=60, seed=0)
    samples = [next(tasks[i] for i in range(60) if tasks[i].task == t) for t in ("image_to_pose", "text_to_pose",
                                                                                 "vqa")]
    pose = torch.as_tensor(np.stack([s.pose6d if s.pose6d is not None else np.zeros((24, 6), np.float32)
                                     for s in samples])).reshape(3, -1) + 0.1
    pose.requires_grad_(True)
    bm, ret = body.BodyModel(), FakeRetriever()
    r, rows = rewards.pose_reward_differentiable(pose, samples, [data.POSE_ANSWER] * 3, ret, bm, train_rft.Args())
    assert rows["joint"].tolist() == [True, False, False] and rows["semantic"].tolist() == [False, True, False]
    with torch.no_grad():
        assert r[0].item() == pytest.approx(rewards.joint_reward(bm.forward_rot6d(pose[:1]).joints,
                                                           torch.as_tensor(samples[0].joints)[None]).item(), rel=1e-5)
        assert r[1].item() == pytest.approx(rewards.semantic_reward([samples[1].text], pose[1:2], ret).item(), rel=1e-5)
    assert r[2].item() == 0
    (g,) = torch.autograd.grad(r.sum(), pose)
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and g[2].abs().sum() == 0


class NotHere:
    def __init__(self, what):
        self.what = what

    def __call__(self, *a, **kw):
        raise AssertionError(f"--algo direct must not use {self.what}")


def test_one_direct_step_trains_the_pose_path_only(monkeypatch):
    """A tiny policy, image-to-pose prompts with the pose answer forced: the KL is 0 at the first step, the
    pose head and LoRA move; HyGRPO's loss (the token log-probabilities' surrogate) and Eq. 10 are never used."""
    tok = vocab.tiny_tokenizer(CFG)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok, image_size=32))
    names, params = train_rft.checkpoint.trainable_params(policy)
    B, G = 2, 3
    args = train_rft.Args(max_new_tokens=10, group_size=G, algo="direct")
    ctx = train_rft.StepContext(policy, tok, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), params,
                                NotHere("Eq. 10"),
                                FakeRetriever(), body.BodyModel(), NotHere("HyGRPO's loss"),
                                rollout.suppressed_tokens(policy, tok))
    answer = tok(" " + data.POSE_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *a, **kw: sample(*a, **kw, logits_processor=force_answer(answer)))
    tasks = data.PoseBenchTasks("train", CFG, length=60, seed=0)
    samples = [s for s in (tasks[i] for i in range(60)) if s.task == "image_to_pose"][:B]
    head = policy.get_base_model().pose_head
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    rec = train_rft.direct_step(ctx, [s for s in samples for _ in range(G)], B, G, args)
    assert "skipped" not in rec, rec
    assert rec["losses/kl_pose"] == pytest.approx(0.0, abs=1e-4) and rec["charts/frac_valid_pose"] == 1.0
    assert rec["rewards/joint"] > 0 and rec["rewards/semantic"] is None and rec["rewards/format"] == 1.0
    after = dict(policy.named_parameters())
    moved = [n for n, v in before.items() if not torch.equal(v, after[n].detach())]
    assert any("pose_head" in n for n in moved) and any("lora" in n for n in moved)
    assert all(torch.isfinite(p).all() for p in head.parameters())

"""probe.py: each objective against a direct computation by metrics.py / rewards.py, gradients
through every objective, and the root error on a hand-made rotation."""
import math

import pytest
import torch

import body
import metrics
import model
import probe
import rewards


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    bm = body.BodyModel()
    head = model.GaussianPoseHead(16, rank=2)
    with torch.no_grad():  # a mean that varies with the state, so the poses differ
        head.mlp[2].weight.normal_(0, 0.05)
    h = torch.randn(5, 16)
    true6d = head.distribution(torch.randn(5, 16)).mean.detach() + 0.1 * torch.randn(5, 144)
    joints = bm.forward_rot6d(true6d).joints + 0.3  # off the pelvis: the metrics centre it
    return bm, head, h, true6d, joints


def test_objectives_match_the_metrics(setup):
    bm, head, h, true6d, joints = setup
    pred = bm.forward_rot6d(head.distribution(h).mean).joints
    mpjpe = metrics.mpjpe_mm(pred.detach(), joints).mean().item() / 1000
    pa = metrics.pa_mpjpe_mm(pred.detach(), joints).mean().item() / 1000
    loss = lambda name: probe.objective_loss(name, head, h, true6d, joints, bm).item()  # noqa: E731
    assert loss("eq7") == pytest.approx(mpjpe, rel=1e-5)
    assert loss("pa") == pytest.approx(pa, rel=1e-5)
    assert loss("eq7+pa") == pytest.approx(mpjpe + pa, rel=1e-5)
    assert loss("6d") == pytest.approx(((head.distribution(h).mean - true6d) ** 2).mean().item(), rel=1e-6)
    # the true root substituted: the same as eq7 on a pose whose root is the truth's
    mu = head.distribution(h).mean.detach()
    swapped = bm.forward_rot6d(torch.cat([true6d[:, :6], mu[:, 6:]], 1)).joints
    assert loss("eq7_true_root") == pytest.approx(metrics.mpjpe_mm(swapped, joints).mean().item() / 1000, rel=1e-5)
    with pytest.raises(ValueError, match="unknown objective"):
        loss("mpjpe")


def test_reward_objective_is_minus_the_mean_joint_reward_of_tempered_samples(setup):
    bm, head, h, true6d, joints = setup
    torch.manual_seed(3)
    got = probe.objective_loss("reward", head, h, true6d, joints, bm, pose_temperature=0.3, samples=3).item()
    torch.manual_seed(3)  # the same draws, one sample set at a time
    p = model.tempered(head.distribution(h), 0.3).rsample((3,))
    want = -sum(rewards.joint_reward(bm.forward_rot6d(p[s]).joints, joints).mean().item() for s in range(3)) / 3
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", probe.OBJECTIVES)
def test_every_objective_has_a_gradient_on_the_mean_network(setup, name):
    bm, head, h, true6d, joints = setup
    head.zero_grad()
    probe.objective_loss(name, head, h, true6d, joints, bm, samples=2).backward()
    g = head.mlp[2].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_root_error_deg_by_hand():
    a = math.radians(40.0)
    rot = torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])
    head = model.GaussianPoseHead(4, rank=0)
    with torch.no_grad():
        head.mlp[2].weight.zero_()  # the mean is then the bias, the rest pose: every root is the identity
    pose6d = torch.zeros(2, 144)
    pose6d[0, :6] = body.matrix_to_rot6d(torch.eye(3))
    pose6d[1, :6] = body.matrix_to_rot6d(rot)
    err = probe.root_error_deg(head, {"h": torch.zeros(2, 4), "pose6d": pose6d})
    assert err.tolist() == pytest.approx([0.0, 40.0], abs=1e-3)

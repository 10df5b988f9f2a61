"""tools/probe.py: each objective against a direct computation by metrics.py / rewards.py, gradients
through every objective, the root error on a hand-made rotation, and the linear root probe against
the least-squares solution and on features that do / do not hold the root."""
import math

import pytest
import torch

import body
import metrics
import model
from tools import probe
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


def test_ridge_fit_is_least_squares_at_a_small_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0]) + 2.0
    y = x @ torch.randn(5, 3, generator=g) + 0.5 + 0.1 * torch.randn(200, 3, generator=g)
    x1 = torch.cat([x, torch.ones(200, 1)], 1).double()
    w = torch.linalg.lstsq(x1, y.double()).solution  # ordinary least squares with a bias
    x_new = torch.randn(7, 5, generator=g)
    got = probe.ridge_fit(x, y, 1e-9)(x_new)
    want = torch.cat([x_new, torch.ones(7, 1)], 1).double() @ w
    assert torch.allclose(got.double(), want, atol=1e-4)
    const = torch.cat([x, torch.full((200, 1), 4.0)], 1)  # a constant feature is harmless
    assert torch.isfinite(probe.ridge_fit(const, y, 1.0)(torch.randn(3, 6, generator=g))).all()


def random_roots(n: int, g: torch.Generator) -> torch.Tensor:
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    angle = (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.radians(60)
    return body.matrix_to_rot6d(body.axis_angle_to_matrix(axis * angle))


def test_linear_root_probe_reads_the_root_only_where_it_is():
    g = torch.Generator().manual_seed(1)
    roots_train, roots_val = random_roots(400, g), random_roots(100, g)
    pose_train = torch.cat([roots_train, torch.zeros(400, 138)], 1)
    pose_val = torch.cat([roots_val, torch.zeros(100, 138)], 1)
    mix = torch.randn(6, 12, generator=g)
    holds = probe.linear_root_probe(roots_train @ mix, pose_train, roots_val @ mix, pose_val)
    assert holds["median_deg"] < 0.1 and holds["frac_over_30_deg"] == 0.0
    assert holds["lambda"] in probe.RIDGE_LAMBDAS
    noise = probe.linear_root_probe(torch.randn(400, 12, generator=g), pose_train, torch.randn(100, 12, generator=g),
                                    pose_val)
    assert noise["median_deg"] > 20.0  # the roots span +-60 deg about random axes; noise predicts about their mean


class FixedHead:
    """A head whose Gaussian is the same at every state: mean `mean6d`, diagonal std `std`."""
    def __init__(self, mean6d, std):
        self.mean6d, self.std = mean6d, std

    def distribution(self, h):
        n = len(h)
        return model.gaussian(self.mean6d.expand(n, -1), self.std.log().expand(n, -1), torch.zeros(n, 144, 0))


def test_score_diagnostics_share_by_hand(setup):
    """At identity rotations (a1 = e_x, a2 = e_y) the directions no rotation depends on are the 6D
    coordinates 0, 3 and 4 of each joint; with a diagonal covariance the Fisher trace's share there
    is sum_unseen 1/v / sum 1/v."""
    bm = setup[0]
    mean6d = model.IDENTITY_6D.repeat(24)
    std = torch.rand(144, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.01
    unseen = torch.tensor([k % 6 in (0, 3, 4) for k in range(144)])
    want = (1 / std[unseen] ** 2).sum() / (1 / std ** 2).sum()
    val = {"h": torch.zeros(6, 4), "joints": bm.forward_rot6d(torch.randn(6, 144) * 0.2 + mean6d).joints}
    got = probe.score_diagnostics(FixedHead(mean6d, std), val, bm, 1.0, n=6, trials=2, true_samples=64)
    assert got["fisher_share_unseen"] == pytest.approx(want.item(), rel=1e-6)
    assert -1 <= got["cosine_params"] <= 1 and -1 <= got["cosine_rotations"] <= 1

"""Tests of the metric functions in metrics.py, each against a slow reference written here."""
import numpy as np
import pytest
import torch

from metrics import (
    mpjpe_mm,
    pa_mpjpe_mm,
    procrustes_align,
    recall_at_k,
    recall_at_k_random,
    gross_state,
    gross_state_correct,
    root_error_deg,
)

J = 24  # SMPL body joints


def random_poses(rng, n, j=J):
    """(n, j, 3) metres: a pelvis somewhere in the room plus joints within ~0.5 m."""
    return rng.uniform(-2, 2, (n, 1, 3)) + rng.normal(0, 0.3, (n, j, 3))


def random_rotation(rng):
    """A uniformly random proper rotation (det +1), (3, 3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# ------------------------------------------------------------------ slow references
def ref_mpjpe_mm(pred, gt):
    out = []
    for p, g in zip(pred, gt):
        p = p - p[0]
        g = g - g[0]
        out.append(np.mean([np.sqrt(np.sum((p[j] - g[j]) ** 2)) for j in range(len(p))]) * 1000)
    return np.array(out)


def ref_umeyama(p, g):
    """One sample: s R p + t closest to g in least squares, R a proper rotation."""
    mu_p, mu_g = p.mean(0), g.mean(0)
    pc, gc = p - mu_p, g - mu_g
    var_p = np.sum(pc**2) / len(p)
    cov = gc.T @ pc / len(p)
    u, d, vt = np.linalg.svd(cov)
    s_fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s_fix[2, 2] = -1
    rot = u @ s_fix @ vt
    scale = np.trace(np.diag(d) @ s_fix) / var_p
    t = mu_g - scale * rot @ mu_p
    return (scale * (rot @ p.T)).T + t


def ref_pa_mpjpe_mm(pred, gt):
    out = []
    for p, g in zip(pred, gt):
        a = ref_umeyama(p, g)
        out.append(np.mean(np.linalg.norm(a - g, axis=1)) * 1000)
    return np.array(out)


def ref_ranks_full(sim):
    n = len(sim)
    return [sum(1 for j in range(n) if sim[i, j] > sim[i, i]) for i in range(n)]


def ref_recall_random(sim, ks, n_candidates, n_repeats, seed):
    """Per-query, per-repeat loop re-drawing the candidates as documented in metrics.py."""
    n = len(sim)
    g = torch.Generator().manual_seed(seed)
    hits = {k: 0 for k in ks}
    for _ in range(n_repeats):
        u = torch.rand(n, n, generator=g, dtype=torch.float32).numpy()
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: (u[i, j], j))
            others = others[: n_candidates - 1]
            rank = sum(1 for j in others if sim[i, j] > sim[i, i])
            for k in ks:
                hits[k] += rank < k
    return {k: 100.0 * hits[k] / (n * n_repeats) for k in ks}


def unit_rows(rng, n, d):
    e = rng.normal(size=(n, d))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# ------------------------------------------------------------------ MPJPE
def test_mpjpe_matches_loop_reference():
    rng = np.random.default_rng(0)
    pred, gt = random_poses(rng, 16), random_poses(rng, 16)
    out = mpjpe_mm(torch.from_numpy(pred), torch.from_numpy(gt))
    assert isinstance(out, torch.Tensor) and out.shape == (16,) and out.is_floating_point()
    np.testing.assert_allclose(out.numpy(), ref_mpjpe_mm(pred, gt), rtol=1e-12, atol=1e-9)
    # numpy input and float32 input give the same numbers
    np.testing.assert_allclose(mpjpe_mm(pred, gt).numpy(), out.numpy(), rtol=1e-12)
    out32 = mpjpe_mm(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
    np.testing.assert_allclose(out32.numpy(), out.numpy(), rtol=1e-5)


def test_mpjpe_hand_computed():
    gt = np.array([[[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]]])
    # whole pose moved by (0.5, 0.5, 0.5) m (removed by pelvis alignment), joint 1 off by
    # (0.03, 0.04, 0) m = 50 mm; pelvis error 0 -> mean 25 mm
    pred = np.array([[[0.5, 0.5, 0.5], [0.63, 0.54, 0.5]]])
    np.testing.assert_allclose(mpjpe_mm(pred, gt).numpy(), [25.0], atol=1e-9)
    assert float(mpjpe_mm(gt, gt)[0]) == 0.0


# ------------------------------------------------------------------ PA-MPJPE
def test_pa_mpjpe_of_similarity_transformed_copy_is_zero():
    rng = np.random.default_rng(1)
    gt = random_poses(rng, 8)
    pred = np.stack(
        [
            rng.uniform(0.5, 2.0) * g @ random_rotation(rng).T + rng.uniform(-3, 3, 3)
            for g in gt
        ]
    )
    assert mpjpe_mm(pred, gt).min() > 10.0  # really different before alignment
    assert pa_mpjpe_mm(pred, gt).max() < 1e-6
    np.testing.assert_allclose(procrustes_align(pred, gt).numpy(), gt, atol=1e-10)


def test_pa_mpjpe_matches_slow_umeyama():
    rng = np.random.default_rng(2)
    pred, gt = random_poses(rng, 32), random_poses(rng, 32)
    # include near-matches too (noisy rotated copies), not only unrelated pairs
    pred[:16] = np.stack(
        [g @ random_rotation(rng).T * 1.3 + rng.normal(0, 0.02, g.shape) for g in gt[:16]]
    )
    np.testing.assert_allclose(
        pa_mpjpe_mm(pred, gt).numpy(), ref_pa_mpjpe_mm(pred, gt), rtol=0, atol=1e-6
    )
    aligned = np.stack([ref_umeyama(p, g) for p, g in zip(pred, gt)])
    np.testing.assert_allclose(procrustes_align(pred, gt).numpy(), aligned, atol=1e-9)


def test_pa_mpjpe_not_above_translation_only_alignment():
    rng = np.random.default_rng(3)
    pred, gt = random_poses(rng, 64), random_poses(rng, 64)
    aligned = procrustes_align(pred, gt).numpy()

    def rms(a, b):
        return np.sqrt(np.mean(np.sum((a - b) ** 2, axis=-1), axis=1))

    # Procrustes minimises the summed squared error, and the identity (plus a translation)
    # is one of the transforms it searches: a theorem for RMS, checked for two translations.
    centred = (pred - pred.mean(1, keepdims=True)) + gt.mean(1, keepdims=True)
    pelvis = (pred - pred[:, :1]) + gt[:, :1]
    assert np.all(rms(aligned, gt) <= rms(centred, gt) + 1e-12)
    assert np.all(rms(aligned, gt) <= rms(pelvis, gt) + 1e-12)
    # The mean distance (what MPJPE reports) is not a theorem but holds for random pairs.
    centred_mm = np.mean(np.linalg.norm(centred - gt, axis=-1), axis=1) * 1000
    assert np.all(pa_mpjpe_mm(pred, gt).numpy() <= centred_mm)
    assert np.all(pa_mpjpe_mm(pred, gt).numpy() <= mpjpe_mm(pred, gt).numpy())


def test_pa_mpjpe_does_not_align_a_mirror_image():
    rng = np.random.default_rng(4)
    pred = random_poses(rng, 8)
    gt = pred * np.array([-1.0, 1.0, 1.0])  # mirrored in x: only a reflection maps one on the other
    pa = pa_mpjpe_mm(pred, gt).numpy()
    assert np.all(pa > 10.0)  # mm; a reflection-allowing alignment would give 0
    np.testing.assert_allclose(pa, ref_pa_mpjpe_mm(pred, gt), rtol=0, atol=1e-6)
    # the fitted transform is a proper rotation: the aligned pose has pred's handedness
    aligned = procrustes_align(pred, gt).numpy()
    a, p = aligned - aligned.mean(1, keepdims=True), pred - pred.mean(1, keepdims=True)
    for ai, pi in zip(a, p):
        m = np.linalg.lstsq(pi, ai, rcond=None)[0]  # ai = pi @ m
        assert np.linalg.det(m) > 0


# ------------------------------------------------------------------ Recall@K, full
def test_recall_identical_embeddings_is_100():
    rng = np.random.default_rng(5)
    e = unit_rows(rng, 50, 16)
    assert recall_at_k(e @ e.T) == {5: 100.0, 10: 100.0, 20: 100.0}
    assert recall_at_k_random(torch.from_numpy(e @ e.T)) == {5: 100.0, 10: 100.0, 20: 100.0}


def test_recall_hand_made_matrix():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # rank 0
            [0.5, 0.4, 0.3, 0.2],  # rank 1
            [0.8, 0.7, 0.1, 0.6],  # rank 3
            [0.2, 0.5, 0.5, 0.5],  # ties with the match are not counted: rank 0
        ]
    )
    assert recall_at_k(sim, ks=(1, 2, 3, 4)) == {1: 50.0, 2: 75.0, 3: 75.0, 4: 100.0}
    # P2T is the transpose: column ranks 0, 2, 3, 1
    assert recall_at_k(sim.T, ks=(1, 2, 3, 4)) == {1: 25.0, 2: 50.0, 3: 75.0, 4: 100.0}


def test_recall_matches_loop_reference():
    rng = np.random.default_rng(6)
    sim = rng.normal(size=(60, 60))
    easy = np.flatnonzero(rng.random(60) < 0.3)
    sim[easy, easy] += 0.8  # some queries with a better-scoring match
    sim = np.round(sim, 1)  # plenty of ties
    ranks = ref_ranks_full(sim)
    ks = (1, 5, 10, 20)
    expect = {k: 100.0 * sum(r < k for r in ranks) / 60 for k in ks}
    got = recall_at_k(sim, ks=ks)
    assert got.keys() == expect.keys()
    for k in ks:
        assert got[k] == pytest.approx(expect[k], abs=1e-9)


# ------------------------------------------------------------------ Recall@K, random
def test_recall_random_matches_loop_reference():
    rng = np.random.default_rng(7)
    n = 48
    sim = rng.normal(size=(n, n)) + 1.5 * np.eye(n)
    sim = np.round(sim, 1)
    ks = (1, 5, 10, 20)
    for seed in (0, 123):
        got = recall_at_k_random(sim, ks=ks, n_candidates=32, n_repeats=3, seed=seed)
        expect = ref_recall_random(sim, ks, n_candidates=32, n_repeats=3, seed=seed)
        for k in ks:
            assert got[k] == pytest.approx(expect[k], abs=1e-9)
    assert recall_at_k_random(sim, seed=5) == recall_at_k_random(sim, seed=5)


def test_recall_random_at_chance_on_random_similarities():
    rng = np.random.default_rng(8)
    sim = torch.from_numpy(rng.normal(size=(512, 512)))
    got = recall_at_k_random(sim, n_candidates=32, n_repeats=10)
    for k in (5, 10, 20):
        # 5120 ranks, binomial sd <= 0.7 %
        assert got[k] == pytest.approx(100.0 * k / 32, abs=2.5)
    full = recall_at_k(sim)
    for k in (5, 10, 20):
        assert full[k] == pytest.approx(100.0 * k / 512, abs=1.5)


# ------------------------------------------------------------------ bad input
def test_bad_joint_inputs_raise_value_error():
    good = np.zeros((4, 24, 3))
    with pytest.raises(ValueError, match=r"mpjpe_mm: pred has shape \(4, 24\) but expected \(N, J, 3\)"):
        mpjpe_mm(np.zeros((4, 24)), good)
    with pytest.raises(ValueError, match=r"pa_mpjpe_mm: gt has shape \(4, 24, 2\)"):
        pa_mpjpe_mm(good, np.zeros((4, 24, 2)))
    with pytest.raises(ValueError, match=r"mpjpe_mm: pred has shape \(4, 23, 3\).*gt \(4, 24, 3\)"):
        mpjpe_mm(np.zeros((4, 23, 3)), good)
    with pytest.raises(ValueError, match=r"procrustes_align: pred has shape \(0, 24, 3\)"):
        procrustes_align(np.zeros((0, 24, 3)), np.zeros((0, 24, 3)))
    bad = good.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"pa_mpjpe_mm: gt .*shape \(4, 24, 3\).* NaN"):
        pa_mpjpe_mm(good, bad)
    bad[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"mpjpe_mm: pred .*inf"):
        mpjpe_mm(torch.from_numpy(bad), good)
    with pytest.raises(ValueError, match=r"mpjpe_mm: pred must be a torch tensor or numpy array"):
        mpjpe_mm("not an array", good)


def test_bad_sim_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"recall_at_k: sim has shape \(4, 5\) but expected a square \(N, N\)"):
        recall_at_k(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"recall_at_k_random: sim has shape \(40, 40, 1\)"):
        recall_at_k_random(np.zeros((40, 40, 1)))
    with pytest.raises(ValueError, match=r"recall_at_k: sim has shape \(0, 0\)"):
        recall_at_k(np.zeros((0, 0)))
    sim = np.eye(40)
    sim[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"recall_at_k_random: sim .*NaN"):
        recall_at_k_random(sim)
    with pytest.raises(ValueError, match=r"recall_at_k_random: sim has shape \(20, 20\).*n_candidates = 32.*N >= 32"):
        recall_at_k_random(np.eye(20))
    with pytest.raises(ValueError, match=r"recall_at_k: ks"):
        recall_at_k(np.eye(4), ks=(0, 5))
    with pytest.raises(ValueError, match=r"recall_at_k_random: n_repeats"):
        recall_at_k_random(np.eye(40), n_repeats=0)


def _rot(axis, deg):
    """Rotation matrix about a unit axis by deg degrees (Rodrigues), (3, 3)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def test_root_error_is_the_angle_of_a_known_rotation():
    rng = np.random.default_rng(0)
    gt = np.stack([random_rotation(rng) for _ in range(5)])
    angles = [0.0, 15.0, 30.0, 90.0, 170.0]
    axes = rng.normal(size=(5, 3))
    pred = np.stack([g @ _rot(ax, d) for g, ax, d in zip(gt, axes, angles)])
    np.testing.assert_allclose(root_error_deg(pred, gt).numpy(), angles, atol=1e-5)
    np.testing.assert_allclose(root_error_deg(gt, pred).numpy(), angles, atol=1e-5)  # symmetric
    with pytest.raises(ValueError, match="root_error_deg"):
        root_error_deg(pred[:, :2], gt)


def test_gross_state_of_hand_made_bodies():
    """An upright rest body, the same body tipped 90 degrees (lying) and 40 degrees (leaning)."""
    import body

    joints = body.BodyModel()(torch.zeros(1, 3), torch.zeros(1, 23, 3)).joints.double()  # (1, J, 3), y up
    joints = joints - joints[:, :1]
    tipped = lambda deg: joints @ torch.as_tensor(_rot([1, 0, 0], deg)).T  # noqa: E731  about the x axis
    states = gross_state(torch.cat([joints, tipped(90), tipped(-90), tipped(40)]))
    assert states.tolist() == [0, 2, 2, 1]  # upright, lying (on the back, on the front), leaning
    with pytest.raises(ValueError, match="gross_state"):
        gross_state(torch.zeros(2, 5, 3))


def test_gross_state_correct_leaves_leaning_bodies_out():
    import body

    joints = body.BodyModel()(torch.zeros(1, 3), torch.zeros(1, 23, 3)).joints.double()
    joints = joints - joints[:, :1]
    tipped = lambda deg: joints @ torch.as_tensor(_rot([1, 0, 0], deg)).T  # noqa: E731
    upright, lying, leaning = joints, tipped(90), tipped(40)
    gt = torch.cat([upright, lying, leaning, upright])
    pred = torch.cat([upright, upright, upright, leaning])  # right, a lying body answered upright, -, wrong
    assert gross_state_correct(pred, gt) == pytest.approx(1 / 3)
    assert gross_state_correct(gt, gt) == 1.0
    assert gross_state_correct(upright, leaning) is None  # no upright or lying ground truth

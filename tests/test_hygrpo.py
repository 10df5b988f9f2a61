"""Tests of hygrpo.py (Eq. 16, Eq. 6/21), each against a slow loop reference written here.

The references loop over b, g, t with math.exp / min / max and no vectorisation; they are
the paper's formulas with this repository's averaging decisions (hygrpo.py, departures 1-5)
spelt out one term at a time.
"""
import math
import time

import pytest
import torch

from hygrpo import (
    default_compile,
    frac_zero_std_groups,
    group_advantages,
    hygrpo_loss,
    make_loss,
)

EPS_CLIP = 0.2
BETA = 0.04
STAT_KEYS = {
    "pg_discrete", "pg_continuous", "kl_token", "kl_pose", "clipfrac_discrete", "clipfrac_continuous",
    "approx_kl_discrete", "approx_kl_continuous", "ratio_pose_mean",
}


# ------------------------------------------------------------------ slow references
def slow_group_advantages(rewards, eps=1e-6):
    """Lists of lists in, lists of lists out: Eq. 16 with the unbiased std, one group at a time."""
    out = []
    for row in rewards:
        G = len(row)
        mean = sum(row) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (G - 1))
        if all(r == row[0] for r in row):
            out.append([0.0] * G)
        else:
            out.append([(r - mean) / (std + eps) for r in row])
    return out


def slow_hygrpo(x, eps=EPS_CLIP, beta=BETA):
    """The HyGRPO loss and stats from plain Python floats (x: dict of nested lists)."""
    B, G, T = len(x["token_logp"]), len(x["token_logp"][0]), len(x["token_logp"][0][0])

    def clip(r):
        return min(max(r, 1 - eps), 1 + eps)

    # discrete: per-token clipped surrogate, mean over each completion's tokens, then over B*G
    pg_d, kl_t, n_tok, n_clip_d, approx_d = 0.0, 0.0, 0, 0, 0.0
    for b in range(B):
        for g in range(G):
            A = x["adv_d"][b][g]
            s_pg, s_kl, n = 0.0, 0.0, 0
            for t in range(T):
                if not x["token_mask"][b][g][t]:
                    continue
                logp, old, ref = x["token_logp"][b][g][t], x["old_token_logp"][b][g][t], x["ref_token_logp"][b][g][t]
                r = math.exp(logp - old)
                s_pg += -min(r * A, clip(r) * A)
                s_kl += math.exp(ref - logp) - (ref - logp) - 1
                n += 1
                n_clip_d += abs(r - 1) > eps
                approx_d += (r - 1) - (logp - old)
            n_tok += n
            if n > 0:
                pg_d += s_pg / n
                kl_t += s_kl / n
    pg_d /= B * G
    kl_t /= B * G

    # continuous: mean over each prompt's valid poses, then over prompts having any
    pg_c, kl_p, n_prompts, n_pose, n_clip_c, approx_c, ratio_sum = 0.0, 0.0, 0, 0, 0, 0.0, 0.0
    for b in range(B):
        s_pg, s_kl, v = 0.0, 0.0, 0
        for g in range(G):
            if not x["pose_valid"][b][g]:
                continue
            lr = x["pose_logp"][b][g] - x["old_pose_logp"][b][g]
            r = math.exp(lr)
            D = x["adv_c"][b][g]
            s_pg += -min(r * D, clip(r) * D)
            s_kl += x["pose_kl"][b][g]
            v += 1
            n_clip_c += abs(r - 1) > eps
            approx_c += (r - 1) - lr
            ratio_sum += r
        n_pose += v
        if v > 0:
            pg_c += s_pg / v
            kl_p += s_kl / v
            n_prompts += 1
    if n_prompts > 0:
        pg_c /= n_prompts
        kl_p /= n_prompts

    loss = pg_d + pg_c + beta * (kl_t + kl_p)
    stats = {
        "pg_discrete": pg_d,
        "pg_continuous": pg_c,
        "kl_token": kl_t,
        "kl_pose": kl_p,
        "clipfrac_discrete": n_clip_d / n_tok if n_tok else 0.0,
        "clipfrac_continuous": n_clip_c / n_pose if n_pose else 0.0,
        "approx_kl_discrete": approx_d / n_tok if n_tok else 0.0,
        "approx_kl_continuous": approx_c / n_pose if n_pose else 0.0,
        "ratio_pose_mean": ratio_sum / n_pose if n_pose else 1.0,
    }
    return loss, stats


def standard_grpo_loss(logp, old, ref, mask, adv, eps=EPS_CLIP, beta=BETA):
    """Plain GRPO (TRL / VLM-R1 style) on flattened (N, T) completions, written independently."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.to(logp.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


# ------------------------------------------------------------------ inputs
def make_inputs(seed=0, B=5, G=6, T=8, pad_value=float("nan"), dtype=torch.float64):
    """Random HyGRPO inputs exercising every corner: clipping on both sides, +/- advantages,
    variable lengths with an empty completion, zero-std groups, a prompt without any valid pose.
    Entries outside the masks hold pad_value (NaN by default: they must be ignored)."""
    gen = torch.Generator().manual_seed(seed)

    def U(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)

    token_logp = U(B, G, T, lo=-4.0, hi=-0.05)
    old_token_logp = token_logp + U(B, G, T, lo=-0.5, hi=0.5)  # num_iterations > 1: off-policy
    ref_token_logp = token_logp + U(B, G, T, lo=-0.5, hi=0.5)
    lengths = torch.randint(0, T + 1, (B, G), generator=gen)
    lengths[0, 0] = 0  # an empty completion
    lengths[0, 1] = T  # a full one
    token_mask = torch.arange(T)[None, None, :] < lengths[:, :, None]  # (B, G, T), right padding

    pose_logp = U(B, G, lo=-200.0, hi=50.0)  # a 144-d Gaussian's log-density: any size
    old_pose_logp = pose_logp + U(B, G, lo=-0.6, hi=0.6)
    pose_kl = U(B, G, lo=0.0, hi=3.0)
    pose_valid = torch.rand(B, G, generator=gen) > 0.3
    pose_valid[0] = True
    pose_valid[min(1, B - 1)] = False  # a prompt with empty V

    r_d = U(B, G)
    r_c = U(B, G)
    r_d[min(2, B - 1)] = 0.7  # zero-std groups: zero advantage
    r_c[min(3, B - 1)] = 0.1
    adv_d = group_advantages(r_d)
    adv_c = group_advantages(r_c)

    x = dict(token_logp=token_logp, old_token_logp=old_token_logp, ref_token_logp=ref_token_logp,
             token_mask=token_mask, pose_logp=pose_logp, old_pose_logp=old_pose_logp, pose_kl=pose_kl,
             pose_valid=pose_valid, adv_d=adv_d, adv_c=adv_c)
    for k in ("token_logp", "old_token_logp", "ref_token_logp"):
        x[k] = torch.where(token_mask, x[k], torch.full_like(x[k], pad_value))
    for k in ("pose_logp", "old_pose_logp", "pose_kl"):
        x[k] = torch.where(pose_valid, x[k], torch.full_like(x[k], pad_value))
    return x


def as_lists(x):
    return {k: v.tolist() for k, v in x.items()}


# ------------------------------------------------------------------ Eq. 16
def test_group_advantages_matches_slow_loop():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 3 - 1
    rewards[4] = 0.1  # all equal: 0.1 * 5 / 5 is not exactly 0.1 in floating point
    adv = group_advantages(rewards)
    ref = torch.tensor(slow_group_advantages(rewards.tolist()), dtype=torch.float64)
    assert adv.shape == (6, 5)
    torch.testing.assert_close(adv, ref, atol=1e-12, rtol=0)
    assert torch.equal(adv[4], torch.zeros(5, dtype=torch.float64))


def test_group_advantages_all_equal_groups_are_zero():
    # float64 0.1 * 3 / 3 != 0.1: without the guard r - mean is ~1e-17, divided by eps ~1e-11
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [0.0, 1.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 3, dtype=torch.float64))
    assert adv[2, 1] > 0 > adv[2, 0]
    assert frac_zero_std_groups(rewards) == pytest.approx(2 / 3)


def test_frac_zero_std_groups_matches_loop():
    rewards = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.0, 0.0], [3.0, -3.0]])
    loop = sum(all(r == row[0] for r in row) for row in rewards.tolist()) / 4
    assert frac_zero_std_groups(rewards) == loop == 0.5


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="rewards.*NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(4))


# ------------------------------------------------------------------ Eq. 6 / 21
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hygrpo_loss_matches_slow_loop(seed):
    x = make_inputs(seed)
    xs = as_lists(x)
    # the inputs exercise what they claim: both clip sides, both advantage signs, empty sets
    m = x["token_mask"]
    ratio_d = torch.exp(x["token_logp"] - x["old_token_logp"])
    A = x["adv_d"][:, :, None].expand_as(ratio_d)
    assert (m & (ratio_d > 1 + EPS_CLIP) & (A > 0)).any() and (m & (ratio_d < 1 - EPS_CLIP) & (A < 0)).any()
    assert (m & (ratio_d > 1 + EPS_CLIP) & (A < 0)).any() and (m & (ratio_d < 1 - EPS_CLIP) & (A > 0)).any()
    v = x["pose_valid"]
    ratio_c = torch.exp(x["pose_logp"] - x["old_pose_logp"])
    assert (v & ((ratio_c - 1).abs() > EPS_CLIP)).any() and (v & ((ratio_c - 1).abs() < EPS_CLIP)).any()
    assert (m.sum(-1) == 0).any() and (~v).all(-1).any() and (x["adv_d"] == 0).all(-1).any()

    token_logp = x["token_logp"].clone().requires_grad_(True)
    pose_logp = x["pose_logp"].clone().requires_grad_(True)
    loss, stats = hygrpo_loss(**{**x, "token_logp": token_logp, "pose_logp": pose_logp},
                              eps_clip=EPS_CLIP, beta=BETA)
    ref_loss, ref_stats = slow_hygrpo(xs)
    assert loss.dim() == 0 and set(stats) == STAT_KEYS
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9, rel=0)
    for k, v_ in ref_stats.items():
        assert stats[k].dim() == 0 and not stats[k].requires_grad
        assert stats[k].item() == pytest.approx(v_, abs=1e-9, rel=0), k
    total = stats["pg_discrete"] + stats["pg_continuous"] + BETA * (stats["kl_token"] + stats["kl_pose"])
    assert loss.item() == pytest.approx(total.item(), abs=1e-12)
    # NaN padding never reaches the gradient
    loss.backward()
    assert torch.isfinite(token_logp.grad).all() and torch.isfinite(pose_logp.grad).all()
    assert (token_logp.grad[~m] == 0).all() and (pose_logp.grad[~v] == 0).all()


def test_continuous_mean_is_over_prompts_with_valid_poses():
    """One prompt with V = 2, one with V = 0: the pose term is that prompt's mean, not half of it."""
    x = make_inputs(0, B=2, G=3, T=2, pad_value=0.0)
    x["pose_valid"] = torch.tensor([[True, True, False], [False, False, False]])
    x["pose_logp"] = x["old_pose_logp"] = torch.zeros(2, 3, dtype=torch.float64)  # ratio 1
    x["adv_c"] = torch.tensor([[1.0, 0.5, -1.5], [2.0, -1.0, -1.0]], dtype=torch.float64)
    x["pose_kl"] = torch.tensor([[0.2, 0.4, 9.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    _, stats = hygrpo_loss(**x)
    assert stats["pg_continuous"].item() == pytest.approx(-(1.0 + 0.5) / 2)
    assert stats["kl_pose"].item() == pytest.approx((0.2 + 0.4) / 2)
    x["pose_valid"] = torch.zeros(2, 3, dtype=torch.bool)  # no pose anywhere: 0, not NaN
    _, stats = hygrpo_loss(**x)
    assert stats["pg_continuous"].item() == 0 and stats["kl_pose"].item() == 0
    assert stats["clipfrac_continuous"].item() == 0 and stats["ratio_pose_mean"].item() == 1


def test_discrete_part_equals_standard_grpo_without_poses():
    x = make_inputs(3, pad_value=0.0)
    x["pose_valid"] = torch.zeros_like(x["pose_valid"])
    B, G, T = x["token_logp"].shape
    logp_a = x["token_logp"].clone().requires_grad_(True)
    logp_b = x["token_logp"].clone().requires_grad_(True)
    loss, _ = hygrpo_loss(**{**x, "token_logp": logp_a}, eps_clip=EPS_CLIP, beta=BETA)
    ref = standard_grpo_loss(logp_b.reshape(B * G, T), x["old_token_logp"].reshape(B * G, T),
                             x["ref_token_logp"].reshape(B * G, T), x["token_mask"].reshape(B * G, T),
                             x["adv_d"].reshape(B * G))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logp_a.grad, logp_b.grad, atol=1e-12, rtol=0)


def test_gradient_at_ratio_one_is_the_policy_gradient_plus_kl():
    x = make_inputs(4, pad_value=0.0)
    B, G, T = x["token_logp"].shape
    token_logp = x["token_logp"].clone().requires_grad_(True)
    pose_logp = x["pose_logp"].clone().requires_grad_(True)
    pose_kl = x["pose_kl"].clone().requires_grad_(True)
    loss, stats = hygrpo_loss(**{**x, "token_logp": token_logp, "old_token_logp": token_logp.detach(),
                                 "pose_logp": pose_logp, "old_pose_logp": pose_logp.detach(),
                                 "pose_kl": pose_kl}, eps_clip=EPS_CLIP, beta=BETA)
    loss.backward()
    m, v = x["token_mask"], x["pose_valid"]
    n_tok = m.sum(-1)  # (B, G)
    n_pose = v.sum(-1)  # (B,)
    n_prompts = int((n_pose > 0).sum())
    for b in range(B):
        for g in range(G):
            for t in range(T):
                if m[b, g, t]:
                    # -A / |a| / (B G) from the surrogate, beta * (1 - pi_ref/pi_theta) / |a| / (B G) from k3
                    d_ref = x["ref_token_logp"][b, g, t].item() - x["token_logp"][b, g, t].item()
                    want = (-x["adv_d"][b, g].item() + BETA * (1 - math.exp(d_ref))) / (n_tok[b, g].item() * B * G)
                else:
                    want = 0.0
                assert token_logp.grad[b, g, t].item() == pytest.approx(want, abs=1e-12)
            if v[b, g]:
                scale = 1.0 / (n_pose[b].item() * n_prompts)
                assert pose_logp.grad[b, g].item() == pytest.approx(-x["adv_c"][b, g].item() * scale, abs=1e-12)
                assert pose_kl.grad[b, g].item() == pytest.approx(BETA * scale, abs=1e-12)
            else:
                assert pose_logp.grad[b, g].item() == 0 and pose_kl.grad[b, g].item() == 0
    assert stats["clipfrac_discrete"].item() == 0 and stats["approx_kl_discrete"].item() == 0


def test_clipfrac_zero_on_policy_and_one_far_off_policy():
    x = make_inputs(5, pad_value=0.0)
    on = {**x, "old_token_logp": x["token_logp"], "old_pose_logp": x["pose_logp"]}
    _, stats = hygrpo_loss(**on)
    assert stats["clipfrac_discrete"].item() == 0 and stats["clipfrac_continuous"].item() == 0
    assert stats["ratio_pose_mean"].item() == 1
    # every ratio far outside [1 - eps, 1 + eps], above for some samples and below for others
    sign = torch.where(torch.rand(x["adv_d"].shape) > 0.5, 1.0, -1.0).to(torch.float64)
    off = {**on, "old_token_logp": x["token_logp"] - 3 * sign[:, :, None], "old_pose_logp": x["pose_logp"] + 3 * sign}
    _, stats = hygrpo_loss(**off)
    assert stats["clipfrac_discrete"].item() == 1 and stats["clipfrac_continuous"].item() == 1
    # one sample far off: exactly its share of the tokens / poses
    one = {**on, "old_token_logp": on["old_token_logp"].clone(), "old_pose_logp": on["old_pose_logp"].clone()}
    one["old_token_logp"][0, 1] -= 3.0  # (0, 1) is a full-length completion with a valid pose
    one["old_pose_logp"][0, 1] -= 3.0
    _, stats = hygrpo_loss(**one)
    m = x["token_mask"]
    assert stats["clipfrac_discrete"].item() == pytest.approx(m[0, 1].sum().item() / m.sum().item())
    assert stats["clipfrac_continuous"].item() == pytest.approx(1 / x["pose_valid"].sum().item())


def test_empty_completions_give_no_nan():
    x = make_inputs(6)
    x["token_mask"] = torch.zeros_like(x["token_mask"])
    x["token_logp"] = x["token_logp"].clone().requires_grad_(True)
    loss, stats = hygrpo_loss(**x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats.values())
    assert stats["pg_discrete"].item() == 0 and stats["kl_token"].item() == 0
    assert (x["token_logp"].grad == 0).all()


def test_shape_mismatch_is_a_clear_error():
    x = make_inputs(0, pad_value=0.0)
    with pytest.raises(ValueError, match="adv_c"):
        hygrpo_loss(**{**x, "adv_c": x["adv_c"][:, :-1]})
    with pytest.raises(ValueError, match="token_mask"):
        hygrpo_loss(**{**x, "token_mask": x["token_mask"][..., :-1]})


# ------------------------------------------------------------------ --compile
def test_make_loss_defaults():
    assert default_compile() == torch.cuda.is_available()
    assert make_loss(False) is hygrpo_loss
    if not torch.cuda.is_available():
        assert make_loss() is hygrpo_loss


def test_compiled_equals_eager():
    x = make_inputs(7)
    compiled = make_loss(True)
    grads = []
    for fn in (hygrpo_loss, compiled):
        token_logp = x["token_logp"].clone().requires_grad_(True)
        pose_logp = x["pose_logp"].clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss, stats = fn(**{**x, "token_logp": token_logp, "pose_logp": pose_logp})
        loss.backward()
        print(f"{'compiled' if fn is compiled else 'eager'}: {time.perf_counter() - t0:.1f} s")
        grads.append((loss.detach(), {k: s.detach() for k, s in stats.items()}, token_logp.grad, pose_logp.grad))
    (l0, s0, gt0, gp0), (l1, s1, gt1, gp1) = grads
    torch.testing.assert_close(l1, l0, atol=1e-12, rtol=1e-12)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], atol=1e-12, rtol=1e-12, msg=k)
    torch.testing.assert_close(gt1, gt0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gp1, gp0, atol=1e-12, rtol=1e-12)


def test_group_advantages_with_a_valid_mask_against_a_loop():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(6, 5, generator=g, dtype=torch.float64)
    valid = torch.rand(6, 5, generator=g) > 0.35
    valid[0] = True          # all valid: the plain Eq. 16
    valid[1] = False         # no pose at all
    valid[2] = False
    valid[2, 3] = True       # a single valid sample: no std, no signal
    rewards[3, valid[3]] = 0.7  # equal valid rewards: no signal
    rewards[4, ~valid[4]] = float("nan")  # invalid entries are never read
    adv = group_advantages(rewards, valid=valid)
    for b in range(6):
        vals = [rewards[b, i].item() for i in range(5) if valid[b, i]]
        for i in range(5):
            if not valid[b, i] or len(vals) < 2 or max(vals) == min(vals):
                ref = 0.0
            else:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                ref = (rewards[b, i].item() - mean) / (std + 1e-6)
            assert abs(adv[b, i].item() - ref) < 1e-9, (b, i)
    assert torch.equal(group_advantages(rewards[:1], valid=valid[:1]), group_advantages(rewards[:1]))


@pytest.mark.parametrize("cuts", [(0, 2, 5), (0, 1, 3, 5)])
def test_micro_batch_losses_with_the_steps_counts_add_up_to_the_whole_batch(cuts):
    """Gradient accumulation (train_rft.py --grad_accum): the batch cut into micro-batches of whole groups,
    each loss divided by the step's counts (n_prompts, n_posed), sums to the slow loop's loss of the whole
    batch, and so do the gradients; without the step's counts the micro-batches' losses do not."""
    x = make_inputs(0)  # B = 5: a prompt without a valid pose, zero-std groups, an empty completion
    ref_loss, ref_stats = slow_hygrpo(as_lists(x))
    B = x["token_logp"].shape[0]
    n_posed = x["pose_valid"].any(1).sum()

    def grads(loss_of):
        leaves = {k: x[k].clone().requires_grad_(True) for k in ("token_logp", "pose_logp", "pose_kl")}
        loss = loss_of({**x, **leaves})
        loss.backward()
        return loss, {k: torch.nan_to_num(v.grad) for k, v in leaves.items()}

    whole, g_whole = grads(lambda y: hygrpo_loss(**y, eps_clip=EPS_CLIP, beta=BETA)[0])
    assert whole.item() == pytest.approx(ref_loss, abs=1e-9, rel=0)

    def micro(y, counts=True):
        total, stats_sum = 0.0, {}
        for a, b in zip(cuts[:-1], cuts[1:]):
            part = {k: v[a:b] for k, v in y.items()}
            loss, stats = hygrpo_loss(**part, eps_clip=EPS_CLIP, beta=BETA,
                                      **(dict(n_prompts=B, n_posed=n_posed) if counts else {}))
            total = total + loss
            for k in ("pg_discrete", "pg_continuous", "kl_token", "kl_pose"):
                stats_sum[k] = stats_sum.get(k, 0.0) + stats[k].item()
        micro.stats = stats_sum
        return total

    summed, g_summed = grads(micro)
    assert summed.item() == pytest.approx(ref_loss, abs=1e-9, rel=0)
    for k in ("pg_discrete", "pg_continuous", "kl_token", "kl_pose"):
        assert micro.stats[k] == pytest.approx(ref_stats[k], abs=1e-9, rel=0), k
    for k in g_whole:
        assert torch.allclose(g_summed[k], g_whole[k], atol=1e-12, rtol=0), k
    assert any(g.abs().max() > 1e-3 for g in g_whole.values())
    naive, _ = grads(lambda y: micro(y, counts=False))  # each micro-batch's own means: not the batch's loss
    assert abs(naive.item() - ref_loss) > 1e-3

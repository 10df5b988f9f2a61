"""HyGRPO: group relative policy optimisation over a hybrid action space (Pose-RFT §3.2, App. B).

The policy answers a prompt q with a hybrid action: a text a (discrete tokens from the LM) and,
when the text contains `<POSE>`, a pose p (a 144-d sample of the Gaussian pose head). HyGRPO
scores the two parts with separate rewards R_d (text) and R_c (pose), normalises each within the
group of G samples of one prompt (Eq. 16), and maximises the sum of two PPO-clipped surrogates,
one per action type, minus a KL penalty to the reference policy (Eq. 6 = Eq. 21). App. B derives
the split (Eq. 12-20); the derivation sits as comments next to the lines it justifies below, and
Algorithm 1 (App. C) is the loop in train_rft.py that calls these functions.

Functions (all pure; tensors in, tensors out):
    group_advantages(rewards)   Eq. 16: (B, G) rewards -> (B, G) group-normalised advantages
    frac_zero_std_groups(rewards)  fraction of groups with no signal (all G rewards equal)
    hygrpo_loss(...)            Eq. 6/21: the loss to minimise and its logged statistics
    make_loss(compile)          hygrpo_loss, or torch.compile(hygrpo_loss)
    default_compile()           whether make_loss compiles by default (CUDA: yes, CPU: no)

Shape letters: B prompts, G samples per prompt, T completion tokens (padded).

Departures from the paper (each deliberate; GRPO/VLM-R1/Visual-RFT practice unless stated):
    1. Ratio against pi_old, KL against pi_ref. Eq. 4/14 write the importance ratio against
       pi_ref; like GRPO (Shao et al. 2024) and PPO in practice we take the ratio against the
       policy that sampled the group (pi_old, log-probs stored at sampling time) and keep
       pi_ref only in the KL term. With one update per batch (num_iterations = 1) the caller
       passes old = logp.detach(): the ratio is 1, its gradient the plain policy gradient,
       and the clip acts only when a batch is reused (num_iterations > 1).
    2. r_d per token. The paper's r_d is one sequence-level ratio pi(a|q) / pi_old(a|q); as
       GRPO, VLM-R1 and Visual-RFT do, we clip per token (ratio of each token's probability),
       average over each completion's valid tokens, then over all B x G completions.
    3. The continuous term's 1/V average: per prompt over its V valid poses (Eq. 6), then the
       mean over the prompts that have V >= 1 (divided by their number, not by B). Eq. 6
       leaves V = 0 undefined; such a prompt (a VQA answer, or a text that forgot `<POSE>`)
       adds nothing, and the pose gradient keeps its scale however many text-only prompts
       share the batch.
    4. One KL split in two. D_KL(pi_theta || pi_ref) of the hybrid policy is
       KL(text) + E_a[KL(pose | a)] (chain rule, from Eq. 12). The text part is GRPO's k3
       estimator per token (Schulman 2020), averaged like the discrete surrogate (per
       completion over tokens, then over B x G); the pose part is the closed-form KL between
       the two Gaussians (given per sample by the caller), averaged like the continuous
       surrogate (per prompt over V, then over prompts with V >= 1).
    5. Eq. 16 divides by the group std; we use the unbiased sample std (torch.std, as GRPO
       and TRL do), add eps = 1e-6 to the denominator, and give a group whose G rewards are
       all equal exactly zero advantage (no signal, never NaN).

Usage (train_rft.py, one optimisation step; `--hybrid false` passes pose_valid all False,
which reduces the loss to plain GRPO, Fig. 4's ablation):
    adv_d = group_advantages(r_text)                      # (B, G)  F_i
    adv_c = group_advantages(r_pose)                      # (B, G)  Delta_i
    loss_fn = make_loss(args.compile)                     # default: default_compile()
    loss, stats = loss_fn(token_logp, old_token_logp, ref_token_logp, token_mask,
                          pose_logp, old_pose_logp, pose_kl, pose_valid, adv_d, adv_c,
                          eps_clip=args.eps_clip, beta=args.beta)
    loss.backward()
    log({k: v.item() for k, v in stats.items()})          # one sync, at logging time
Under DDP each rank calls this on its own whole groups; the averages (over B x G completions,
over a rank's prompts with a pose) are per rank and DDP then averages gradients over ranks.

Tests: tests/test_hygrpo.py checks every function against slow loop references
(`python -m pytest tests/test_hygrpo.py -q`; CPU, < 1 min).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "group_advantages",
    "frac_zero_std_groups",
    "hygrpo_loss",
    "make_loss",
    "default_compile",
]

Stats = Dict[str, torch.Tensor]


# ---- ALGO: Eq. 15-16 (decomposed, group-normalised advantages)
def _check_rewards(rewards: torch.Tensor, name: str) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"{name} must be a (B, G) tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if rewards.shape[1] < 2:
        raise ValueError(f"{name}: group normalisation needs G >= 2, got G = {rewards.shape[1]}")
    if not bool(torch.isfinite(rewards).all()):  # one host sync per call: rewards are scored on host anyway
        raise ValueError(f"{name} contains NaN or inf")


def _zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(B, G) -> (B,) bool: the groups whose G rewards are all exactly equal."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Group-normalised advantages, Eq. 16, for one reward (R_d gives F_i, R_c gives Delta_i).

    Args:
        rewards: (B, G) one reward per sample; row b holds the G samples of prompt b.
        eps: added to the group std (Eq. 16 has none; it only matters for near-equal rewards).
        valid: optional (B, G) bool: only these samples enter the group's mean and std, and the
            others get advantage 0. For R_c it is the set V of Eq. 6 (samples with a pose): a
            completion that forgot `<POSE>` has no pose reward to compare.

    Returns:
        (B, G) (r - mean_G) / (std_G + eps), with the unbiased sample std over the group's (valid)
        samples (torch.std, as GRPO/TRL). A group whose (valid) rewards are all equal, or that
        has fewer than 2 valid samples, gets exact zeros.

    Raises:
        ValueError: G < 2 (the std of one sample is undefined) or a NaN/inf reward.
    """
    if valid is None:
        _check_rewards(rewards, "rewards")
        valid = torch.ones_like(rewards, dtype=torch.bool)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid must have the shape of rewards {tuple(rewards.shape)}, got {tuple(valid.shape)}")
        valid = valid.bool()
        _check_rewards(torch.where(valid, rewards, torch.zeros_like(rewards)), "rewards")  # invalid may be NaN
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(dim=1, keepdim=True).to(rewards.dtype)  # (B, 1) group size |V|
    # Eq. 15: A = F + Delta is never formed; each part is normalised on its own reward (Eq. 16).
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)  # (B, 1)
    var = torch.where(valid, (r - mean) ** 2, torch.zeros_like(r)).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    adv = (r - mean) / (var.sqrt() + eps)  # Eq. 16: F_i = (R_d^(i) - mean) / std, unbiased std
    # Rounding can leave r - mean ~ 1e-17 in an all-equal group; that group has no signal: 0.
    big = torch.finfo(rewards.dtype).max
    hi = torch.where(valid, r, torch.full_like(r, -big)).amax(dim=1)
    lo = torch.where(valid, r, torch.full_like(r, big)).amin(dim=1)
    dead = (hi == lo) | (n[:, 0] < 2)  # (B,) no signal in this group
    return torch.where(dead[:, None] | ~valid, torch.zeros_like(adv), adv)  # (B, G)


def frac_zero_std_groups(rewards: torch.Tensor) -> float:
    """Fraction of the B groups whose G rewards are all equal (zero advantage, no signal).

    Logged as `charts/frac_zero_std_groups` (one per reward); same checks as group_advantages.
    """
    _check_rewards(rewards, "rewards")
    return float(_zero_std_groups(rewards).double().mean())


# ---- ALGO: Eq. 6 / 21 (decomposed clipped objective + KL)
def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of x over the entries where mask is true, along dim; 0 where there are none."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim)
    count = mask.sum(dim).to(x.dtype)
    return total / count.clamp(min=1)  # an empty slice: 0 / 1 = 0, never NaN


def _prompt_then_batch_mean(x: torch.Tensor, valid: torch.Tensor,
                            n_posed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, G) -> (): mean over each prompt's valid samples, then over prompts with any.

    Departure 3: divides by the number of prompts with >= 1 valid sample (not by B); a prompt
    with none adds 0 to the sum and 0 to the count. No valid sample at all gives 0. `n_posed`, if
    given, is that number over the whole step (gradient accumulation: the micro-batches' sums add up).
    """
    per_prompt = _masked_mean(x, valid, dim=1)  # (B,)  (1/V) sum_{i in V}
    has_any = valid.any(dim=1)  # (B,)
    return per_prompt.sum() / (has_any.sum() if n_posed is None else n_posed).to(x.dtype).clamp(min=1)


def _batch_mean(x: torch.Tensor, n_prompts: Optional[int] = None) -> torch.Tensor:
    """(B, G) -> (): the mean over all B G samples, or their sum over n_prompts x G (a micro-batch's share
    of a step of n_prompts prompts)."""
    return x.mean() if n_prompts is None else x.sum() / (n_prompts * x.shape[1])


def _clipped_surrogate_loss(ratio: torch.Tensor, adv: torch.Tensor, eps_clip: float) -> torch.Tensor:
    """PPO's clipped surrogate as a loss (CleanRL naming): -min(r A, clip(r) A) = max(pg_loss1, pg_loss2)."""
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip)
    return torch.max(pg_loss1, pg_loss2)


def hygrpo_loss(
    token_logp: torch.Tensor,
    old_token_logp: torch.Tensor,
    ref_token_logp: torch.Tensor,
    token_mask: torch.Tensor,
    pose_logp: torch.Tensor,
    old_pose_logp: torch.Tensor,
    pose_kl: torch.Tensor,
    pose_valid: torch.Tensor,
    adv_d: torch.Tensor,
    adv_c: torch.Tensor,
    eps_clip: float = 0.2,
    beta: float = 0.04,
    n_prompts: Optional[int] = None,
    n_posed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Stats]:
    """The HyGRPO loss, -(J_d + J_c - beta KL) (Eq. 6 = Eq. 21), and its statistics.

    Entries outside token_mask / pose_valid are ignored and may hold anything (even NaN/inf):
    they are replaced before any arithmetic, so neither the loss nor its gradient sees them.

    Args:
        token_logp: (B, G, T) log pi_theta of each sampled token (carries the gradient).
        old_token_logp: (B, G, T) log pi_old of the same tokens, stored at sampling (no grad).
        ref_token_logp: (B, G, T) log pi_ref of the same tokens (no grad).
        token_mask: (B, G, T) bool (or 0/1): which positions are completion tokens.
        pose_logp: (B, G) log pi_theta(p_i | q, a_i) of the sampled pose, summed over its 144 dims.
        old_pose_logp: (B, G) the same under pi_old (no grad).
        pose_kl: (B, G) closed-form KL(pi_theta(.|q,a_i) || pi_ref(.|q,a_i)) of the pose
            Gaussians, e.g. torch.distributions.kl_divergence(pi_theta, pi_ref).
        pose_valid: (B, G) bool: sample i has a valid pose (the set V of Eq. 6).
        adv_d: (B, G) discrete advantages F_i (group_advantages of R_d).
        adv_c: (B, G) continuous advantages Delta_i (group_advantages of R_c).
        eps_clip: PPO clip range epsilon of Eq. 21 (the paper gives no value; 0.2 as PPO/GRPO).
        beta: KL coefficient of Eq. 21 (the paper gives no value; 0.04 as GRPO and VLM-R1).
        n_prompts, n_posed: the step's number of prompts and of prompts with a valid pose, when this
            call scores one micro-batch of it (gradient accumulation): the batch means then divide by
            the step's counts, so the micro-batches' losses (and their gradients) sum to the loss of
            the step's whole batch. None: this call's own B and prompts with a valid pose.

    Returns:
        loss: () to minimise; loss = pg_discrete + pg_continuous + beta * (kl_token + kl_pose).
        stats: 0-dim detached tensors (call .item() when logging; no host sync here):
            pg_discrete, pg_continuous: the two surrogate terms as losses (-J_d, -J_c);
            kl_token (k3, per token), kl_pose (closed form, per pose);
            clipfrac_discrete: fraction of valid tokens with |ratio - 1| > eps_clip (CleanRL);
            clipfrac_continuous: the same over the valid poses;
            approx_kl_discrete, approx_kl_continuous: k3 estimate of KL(pi_old || pi_theta)
                (CleanRL's approx_kl), over valid tokens / valid poses;
            ratio_pose_mean: mean pose ratio over the valid poses (1 if there are none).
    """
    B, G, T = token_logp.shape
    for name, t in (("old_token_logp", old_token_logp), ("ref_token_logp", ref_token_logp), ("token_mask", token_mask)):
        if t.shape != (B, G, T):
            raise ValueError(f"{name} must have shape {(B, G, T)} like token_logp, got {tuple(t.shape)}")
    for name, t in (("pose_logp", pose_logp), ("old_pose_logp", old_pose_logp), ("pose_kl", pose_kl),
                    ("pose_valid", pose_valid), ("adv_d", adv_d), ("adv_c", adv_c)):
        if t.shape != (B, G):
            raise ValueError(f"{name} must have shape {(B, G)}, got {tuple(t.shape)}")
    token_mask = token_mask.bool()
    pose_valid = pose_valid.bool()
    zeros_t = torch.zeros_like(token_logp)
    zeros_p = torch.zeros_like(pose_logp)

    # Eq. 12: pi_theta(a, p | q) = pi_d(a | q) * pi_c(p | q, a), so the ratio factorises
    # (Eq. 14): r = r_d * r_c, and log-probs of the two parts come from separate heads.
    # Eq. 17-19: moving E_p inside, E_p[r_c] = 1 turns the F term into J_d = E[r_d F], and
    # the Delta term into J_c = E[r_d r_c Delta]: J = J_d + J_c, one surrogate per action type.

    # -- discrete part, J_d (Eq. 21, first sum): ratio against pi_old, not pi_ref (departure 1)
    log_ratio_d = torch.where(token_mask, token_logp - old_token_logp, zeros_t)  # (B, G, T)
    ratio_d = torch.exp(log_ratio_d)  # (B, G, T); the paper's sequence r_d, taken per token (departure 2)
    # Eq. 21, first sum: -min(r_d F, clip(r_d, 1 - eps, 1 + eps) F), per token
    pg_tok = _clipped_surrogate_loss(ratio_d, adv_d[:, :, None], eps_clip)  # (B, G, T)
    # (1/|a_i|) sum_t, then (1/(B G)) sum_{b,i}
    pg_discrete = _batch_mean(_masked_mean(pg_tok, token_mask, dim=2), n_prompts)

    # -- continuous part, J_c (Eq. 21, second sum)
    # Eq. 20: r_d does not depend on the pose head's own parameters and the text of a posed
    # answer is templated, so r_d is treated as a constant and dropped: J_c uses r_c alone.
    log_ratio_c = torch.where(pose_valid, pose_logp - old_pose_logp, zeros_p)  # (B, G)
    ratio_c = torch.exp(log_ratio_c)  # (B, G) r_c = pi_theta(p|q,a) / pi_old(p|q,a)
    # Eq. 21, second sum: -min(r_c Delta, clip(r_c, 1 - eps, 1 + eps) Delta), clipped apart from r_d
    pg_pose = _clipped_surrogate_loss(ratio_c, adv_c, eps_clip)  # (B, G)
    # (1/V) sum_{i in V} per prompt, then the mean over prompts with V >= 1 (departure 3)
    pg_continuous = _prompt_then_batch_mean(pg_pose, pose_valid, n_posed)

    # -- KL to pi_ref (departure 4)
    d_ref = torch.where(token_mask, ref_token_logp - token_logp, zeros_t)  # (B, G, T) log(pi_ref / pi_theta)
    k3 = torch.exp(d_ref) - d_ref - 1.0  # (B, G, T) k3 >= 0; unbiased for KL(pi_theta || pi_ref) on-policy
    kl_token = _batch_mean(_masked_mean(k3, token_mask, dim=2), n_prompts)
    kl_pose = _prompt_then_batch_mean(torch.where(pose_valid, pose_kl, zeros_p), pose_valid, n_posed)

    # Eq. 6 / 21: J_HyGRPO = J_d + J_c - beta KL; we minimise its negative.
    loss = pg_discrete + pg_continuous + beta * (kl_token + kl_pose)

    # ---- BOILERPLATE: statistics (detached, 0-dim; compile-friendly)
    with torch.no_grad():
        n_tok = token_mask.sum().to(token_logp.dtype).clamp(min=1)
        n_pose = pose_valid.sum().to(pose_logp.dtype)
        clipped_d = token_mask & ((ratio_d - 1.0).abs() > eps_clip)
        clipped_c = pose_valid & ((ratio_c - 1.0).abs() > eps_clip)
        stats = {
            "pg_discrete": pg_discrete.detach(),
            "pg_continuous": pg_continuous.detach(),
            "kl_token": kl_token.detach(),
            "kl_pose": kl_pose.detach(),
            "clipfrac_discrete": clipped_d.sum().to(token_logp.dtype) / n_tok,
            "clipfrac_continuous": clipped_c.sum().to(pose_logp.dtype) / n_pose.clamp(min=1),
            # CleanRL's approx_kl: mean of (r - 1) - log r, the k3 estimate of KL(pi_old || pi_theta)
            "approx_kl_discrete": torch.where(token_mask, (ratio_d - 1.0) - log_ratio_d, zeros_t).sum() / n_tok,
            "approx_kl_continuous": torch.where(pose_valid, (ratio_c - 1.0) - log_ratio_c, zeros_p).sum()
            / n_pose.clamp(min=1),
            # no valid pose: 1, the ratio of an unchanged policy (a neutral value, not a measurement)
            "ratio_pose_mean": torch.where(n_pose > 0, torch.where(pose_valid, ratio_c, zeros_p).sum()
                                           / n_pose.clamp(min=1), torch.ones_like(n_pose)),
        }
    return loss, stats


# ---- BOILERPLATE: --compile
def default_compile() -> bool:
    """Compile the loss by default only on CUDA.

    On CPU torch.compile makes this loss about 2x faster, but compiling it (forward + backward)
    takes about 20-25 s per fresh process on a 2-core CPU with a cold inductor cache (about 3 s
    with a warm one), plus one recompile when the padded length T first changes (after which
    T is dynamic): more than it saves next to the model's forward pass.
    """
    return torch.cuda.is_available()


def make_loss(compile: Optional[bool] = None) -> Callable[..., Tuple[torch.Tensor, Stats]]:
    """hygrpo_loss, or torch.compile(hygrpo_loss) when compile is true (None: default_compile()).

    The compiled function returns exactly what hygrpo_loss returns. fullgraph=True: the loss
    is one graph (stats stay tensors, no .item()), and an edit that breaks it fails loudly.
    """
    if compile is None:
        compile = default_compile()
    return torch.compile(hygrpo_loss, fullgraph=True) if compile else hygrpo_loss

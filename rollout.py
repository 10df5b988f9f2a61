"""Algorithm 1, line 6: a rollout, G hybrid answers (text, then the pose at `<POSE>`) sampled for each
prompt with model.sample, and the log-probabilities HyGRPO's ratios and KL read off it: the tokens' under
the text policy that sampled them, the poses' under the head's Gaussian at the pose temperature
(optionally on the 72 directions that change a rotation, --pose_space rotations)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import data
import model


@dataclass
class Rollout:
    """G samples of B prompts, flattened to N = B * G rows (row b * G + i is sample i of prompt b)."""
    sequences: torch.Tensor       # (N, T_p + T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (N, T_p + T) prompt mask, then 1 up to and including the first eos
    completion_mask: torch.Tensor  # (N, T) the completion's tokens (what the discrete policy chose)
    pixel_values: torch.Tensor | None
    prompt_len: int               # T_p
    pose_pos: torch.Tensor        # (N,) index of <POSE> in `sequences` (-1: none)
    has_pose: torch.Tensor        # (N,) bool: a <POSE> state exists (the set V before task checks)
    pose: torch.Tensor            # (N, P) the sampled action p_i (zeros where there is none)
    texts: list                   # N decoded answers
    pose_mean: torch.Tensor | None = None  # (N, P) the mean of the Gaussian p_i was drawn from
    group: int = 1                # G (the rows are B prompts repeated G times each)
    pose_values: torch.Tensor | None = None  # (K, J, 6) the input poses of the rows that have one (data.Batch)


def suppressed_tokens(policy, tokenizer) -> list:
    """Tokens the policy never emits: the input placeholders (image, input pose), padding and bos (never
    eos, which a tokenizer may use as padding). Masked alike in sampling and in the log-probs, so the
    policy that samples is exactly the one that is scored."""
    ids = {*model.input_only_tokens(policy.get_base_model().config), tokenizer.pad_token_id, tokenizer.bos_token_id}
    return sorted(i for i in ids if i is not None and i != tokenizer.eos_token_id)


@torch.no_grad()
def rollout(policy, tokenizer, samples, args, device) -> Rollout:
    """Generate G hybrid outputs per prompt; `samples` already holds each prompt G times."""
    inner = policy.get_base_model()
    b = data.collate(samples, tokenizer, inner.num_image_tokens, add_answer=False, pad_side="left").to(device)
    T_p = b.input_ids.shape[1]
    gen = model.sample(inner, b.input_ids, b.attention_mask, b.pixel_values, args.max_new_tokens,
                       tokenizer.eos_token_id, tokenizer.pad_token_id, suppressed_tokens(policy, tokenizer),
                       args.temperature, args.group_size, pose_values=b.pose_values)
    states, has_pose, pose_pos = gen.states, gen.has_pose, gen.pose_pos
    new = gen.sequences[:, T_p:]  # (N, T)
    is_eos = new == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # tokens generated after the first eos
    completion_mask = ~after_eos
    dist = model.tempered(inner.pose_head.distribution(states), args.pose_temperature)
    # Eq. 2: p_i ~ N(mu, Sigma) (HyGRPO); plain GRPO keeps the head's mean (Fig. 4's baseline)
    pose = dist.sample() if args.hybrid else dist.mean
    if not args.explore_root:  # --explore_root false: the root stays at the head's mean
        pose[:, :model.ROOT_DIMS] = dist.mean[:, :model.ROOT_DIMS]
    pose = torch.where(has_pose[:, None], pose, torch.zeros_like(pose))
    texts = [data.clean_answer(t, tokenizer) for t in tokenizer.batch_decode(new, skip_special_tokens=False)]
    return Rollout(gen.sequences, torch.cat([b.attention_mask, completion_mask.long()], 1), completion_mask,
                   b.pixel_values, T_p, pose_pos, has_pose, pose, texts, dist.mean, args.group_size, b.pose_values)


def logprobs(policy, ro: Rollout, suppressed: list, pose_temperature: float = 1.0, temperature: float = 1.0):
    """Teacher-forced token log-probs of the completion (N, T) under the text policy that sampled it
    (softmax of logits / `temperature`, the suppressed tokens masked), and the pose policy (N, P), the
    head's Gaussian at `pose_temperature` (model.tempered)."""
    T_p = ro.prompt_len
    logits, dist, _ = model.forward_grouped(policy.get_base_model(), ro.sequences, ro.attention_mask, ro.pixel_values,
                                            T_p, ro.group, ro.pose_pos, ro.pose_values)  # each prompt read once
    logits = logits.float() / temperature  # (N, T, V): position t predicts answer token t
    logits[..., suppressed] = float("-inf")  # the same policy that sampled (see suppressed_tokens)
    logp = torch.log_softmax(logits, -1)
    token_logp = logp.gather(-1, ro.sequences[:, T_p:, None]).squeeze(-1)  # (N, T)
    return token_logp, model.tempered(dist, pose_temperature)


def pose_log_prob(dist, pose: torch.Tensor, explore_root: bool = True,
                  basis: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(p_i) of the sampled poses (N,); with the root not explored, the log-density of the
    body's 138 dimensions under their marginal (the root is then a deterministic function of the
    state, not part of the sampled action). With a rotation basis U (--pose_space rotations), the
    log-density of U^T p_i under the marginal N(U^T mu, U^T Sigma U)."""
    if basis is not None:
        return model.projected(dist, basis).log_prob((basis.transpose(-1, -2) @ pose[..., None])[..., 0])
    if explore_root:
        return dist.log_prob(pose)
    return model.marginal(dist, model.ROOT_DIMS).log_prob(pose[:, model.ROOT_DIMS:])


def pose_kl(dist, ref_dist, basis: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32 closed-form KL(pi_theta || pi_ref) of the pose Gaussians, or of their marginals on U,
    computed in float64: in float32 the KL of the tiny preset's 144-d low-rank Gaussian with itself came
    out at up to 6e-3 a sample where it is 0 (a log-determinant and a trace of that size cancelling)."""
    dist, ref_dist = model.in_float64(dist), model.in_float64(ref_dist)
    if basis is not None:
        dist, ref_dist = model.projected(dist, basis.double()), model.projected(ref_dist, basis.double())
    return torch.distributions.kl_divergence(dist, ref_dist).float()


def pose_basis(ro: Rollout, args) -> torch.Tensor | None:
    """--pose_space rotations: U (N, P, K) at the sampling mean (fixed for the step, so pi_old, pi_theta
    and pi_ref are compared on the same directions); the root's three are left out when it is not
    explored. None for --pose_space params."""
    if args.pose_space != "rotations":
        return None
    return model.rotation_basis(ro.pose_mean.float(), start=0 if args.explore_root else 1)

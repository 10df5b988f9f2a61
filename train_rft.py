"""Reinforcement fine-tuning of PoseLlava with HyGRPO: Algorithm 1 of Pose-RFT (App. C, §3.2-3.3).

    for each step:                                             (Algorithm 1, lines 4-10)
        sample B prompts; G hybrid outputs each (text a_i at temperature 1, pose p_i from the
            Gaussian head at the `<POSE>` state read while sampling, model.sample)      line 6
        rewards: R_d = R_format (+ R_text on QA prompts) scores a_i; R_c = R_joint (image) or R_semantic
            (text) scores p_i (rewards.py)                                              line 7
        advantages F_i, Delta_i normalised within each group (Eq. 16, hygrpo.py)        line 8
        num_iterations updates of the HyGRPO objective (Eq. 6/21)                       line 9

One step costs one sampling loop, one reference forward without gradient, and one policy forward +
backward per iteration, each reading a prompt (its image, input pose and text) once for its G answers
(model.forward_grouped: the prompt's KV cache repeated G times); the old log-probs are the first
iteration's, detached (with num_iterations = 1 the ratio is exactly 1 and its gradient the policy gradient),
and pi_ref is the same network with its frozen SFT adapter alone (presets.reference). The policy starts from an SFT
checkpoint: the SFT run's base with the SFT adapter kept frozen beside a fresh LoRA whose update is
added to it (presets.rft_policy; nothing merged, no copy of the base: the run's base/ links to the SFT
run's), so pi_init = pi_ref = the SFT policy bit for bit on every preset (Algorithm 1, line 3).

Ablations, defaults = the paper:
    --algo direct           DrPose-style direct reward fine-tuning of the pose instead of HyGRPO (below)
    --hybrid false          plain GRPO (Fig. 4): only the text is optimised, the pose is the head's mean
    --zero_reward NAME      zero-mask one reward (Table 5): joint, semantic, format or text (caption, posecode:
                            the pose-input tasks')
    --deterministic_head    Table 3: an SFT checkpoint with a mean-only head (train_sft.py --deterministic_head)
                            that samples with its fixed spread and learns only the mean
Probes of why image-to-pose does not improve here (docs/FINDINGS.md, finding 4), not the paper's:
    --joint_reward_align procrustes   the joint reward after a similarity alignment
    --explore_root false              the global orientation is not sampled (the head's mean)
Ours, a variance reduction (docs/FINDINGS.md, finding 6):
    --pose_space rotations            the pose ratio and KL on the Gaussian's marginal over the 72
                                      directions that change a rotation (model.rotation_basis)

Departures from the paper: see hygrpo.py (ratio against pi_old; per-token r_d; the V average) and
rewards.py (eps in Eq. 7; MiniLM for Eq. 10, BGE-M3 by --text_encoder).

--algo direct (ours, beside HyGRPO; DrPose's direct reward fine-tuning). DrPose fine-tunes its generator by
backpropagating a differentiable reward (its PoseScore) into the weights, with a KL to the frozen initial
model, instead of sampling and scoring groups. Here, on the same prompts, budget (B prompts x G sampled
answers a step), beta, learning rate and pose temperature as HyGRPO, with the same Gaussian head:

    loss = -R(p) + beta KL(pi_theta(. | q, a) || pi_ref(. | q, a)),   p = mu + tau L eps,  eps ~ N(0, I)

where L L^T = Sigma is the head's covariance at the <POSE> state (read after the sampled text a, as
HyGRPO's), tau the pose temperature, R the part of HyGRPO's R_c that is differentiable in the pose (Eq. 7
through the body model, Eq. 8 through the reward retriever's pose encoder; abstract_to_pose's R_reasoning
or R_archetype), and KL the closed-form Gaussian KL of HyGRPO's continuous term (`direct_loss`: both averaged
per prompt over its posed samples, then over prompts). The gradient reaches mu, L and the LoRA below the
<POSE> state through p: no group, no advantage, no ratio. The text branch is not trained: no token
log-probability enters the loss (the text is sampled only to reach <POSE>; the shared LoRA moves by the pose's
gradient alone), so R_format, R_text and the step-function rewards (R_posecode, R_plausible) are not used.

Defaults by preset (applied only to flags not given): --steps, --batch_size, --lr, --eval_samples and
--pose_temperature are 600 / 8 / 1e-4 / 1000 / 0.3 for tiny and smol (sizes a 2-core CPU finishes),
Table 4's 1000 / 16 / 1e-6 (no posebench evaluation, temperature 1) for llava-1.5-7b.

The pose temperature (ours; the paper samples the head's Gaussian as it is): poses are sampled, and their
ratios and KL taken, at N(mu, tau^2 Sigma). The SFT covariance is very uneven (beta-NLL puts sigma at its
floor in the 6D directions no rotation depends on, and far higher on the root), so at tau = 1 the noise
breaks the samples and the rewards rank them by how badly; a smaller spread keeps them local, and their
rewards then say which way is better (docs/FINDINGS.md, finding 2, has the measurements).

The pose space (ours, `--pose_space rotations`; the default `params` is Eq. 2 as written). The rewards
see a pose only through its rotations, and Gram-Schmidt makes each joint's rotation blind to half of
its 6D (either column's length, the second column's component along the first). That is where the SFT
head is most certain (sigma at its floor), so the score Sigma^-1 (p - mu) of a sample, which the
advantage multiplies, is mostly noise no reward can see. `rotations` takes the pose ratio and KL of the
Gaussian's marginal on the 72 directions that change a rotation (model.rotation_basis, at the sampling
mean): to first order the score's expectation given the rotations, the same gradient in expectation
without that noise (tools/probe.py measures both; docs/FINDINGS.md, finding 6).

The 7B preset starts from a `train_sft.py --preset llava-1.5-7b` checkpoint and trains on the real datasets
given by the same data flags as SFT; it needs --smpl_path (the joint reward), and checks every asset and data
file before anything is loaded or written (realdata.preflight_real), naming every problem with its flag, file,
record and fix.

Metrics (metrics.jsonl, one JSON object per logged step; docs/TRAINING.md explains each):
    rewards/{joint,semantic,format,text}, rewards/discrete, rewards/continuous, (abstract_to_pose:
    rewards/{plausible,reasoning,posecode,archetype}; --algo direct: losses/direct_reward, rewards/abstract_pose)
    losses/{pg_discrete,pg_continuous,kl_token,kl_pose,total}, charts/{clipfrac_discrete,
    clipfrac_continuous,frac_zero_std_groups,frac_valid_pose,pose_std_mean,ratio_pose_mean,lr,
    gpu_peak_gib (CUDA only)}, time/{generate,rewards,reference,policy,optimizer,total}_s

Run:
    python train_rft.py --sft_dir ckpt/sft                      # tiny preset, CPU
    python train_rft.py --sft_dir ckpt/sft --algo direct        # DrPose-style direct reward fine-tuning
    python train_rft.py --sft_dir ckpt/sft_abs --mix 0.4 0.4 0.2 0 0 0.4 --max_new_tokens 48   # + abstract prompts
        # (an SFT run with the same 6 weights; both with --reasoning false for the control without reasoning)
    torchrun --nproc_per_node=8 train_rft.py --preset smol ...  # whole groups stay on one rank
    torchrun --nproc_per_node=8 train_rft.py --preset llava-1.5-7b --sft_dir ckpt/sft_7b --smpl_path SMPL_NEUTRAL.pkl \
        --posescript_dir ... --amass_dir ... --image_npz ... --text_encoder /models/bge-m3   # docs/REAL_RUNS.md
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import body
import checkpoint
import data
import figures
import hygrpo
import model
import plumbing
import posebench
import presets
import realdata
import retrieval
import rewards
import rollout
import sentences
from evaluate import evaluate_policy


@dataclass
class ScriptFlags:
    preset: str = field(default="tiny", metadata={"help": "tiny, smol or llava-1.5-7b; must match the SFT checkpoint"})
    sft_dir: str = field(default="ckpt/sft", metadata={"help": "train_sft.py's output directory (pi_init)"})
    out_dir: str = field(default="ckpt/rft", metadata={"help": "checkpoints, metrics.jsonl, reward curves"})
    reward_retriever: str = field(default="ckpt/retriever_reward", metadata={
        "help": "retrieval.py's reward model (Eq. 8)"})
    eval_retriever: str = field(default="ckpt/retriever_eval", metadata={"help": "the independent evaluator retriever"})
    text_encoder: str = field(default="", metadata={
        "help": "sentence-transformers model dir for Eq. 10 ('' : MiniLM; the paper's BGE-M3: a local copy of "
                "BAAI/bge-m3)"})
    seed: int = field(default=0, metadata={"help": "seed; rank r uses seed + r"})
    resume: bool = field(default=False, metadata={"help": "continue exactly from out_dir's latest checkpoint"})
    n_train: int = field(default=20000, metadata={"help": "posebench training poses (must match SFT's benchmark)"})
    n_val: int = field(default=1000, metadata={"help": "posebench validation poses"})
    n_test: int = field(default=1000, metadata={"help": "posebench test poses"})
    steps: int | None = field(default=None, metadata={
        "help": "RFT steps; default by preset: 600, llava-1.5-7b 1000 (Table 4)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "prompts per step, B; default by preset: 8, llava-1.5-7b 16 (Table 4)"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt, G (>= 2)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step, N: each process samples, scores and backpropagates "
                "--batch_size / (processes x N) prompts (whole groups) at a time, and one update applies their "
                "summed gradient: the update of the whole batch (fewer GPUs or less memory: raise N)"})
    num_workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes reading and cropping the prompts (0: the main process); the prompts "
                "are the same whatever the number"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate; default by preset: 1e-4, llava-1.5-7b 1e-6 (Table 4)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up before the cosine decay"})
    num_iterations: int = field(default=1, metadata={
        "help": "updates per sampled batch (pi_old = the sampling policy)"})
    eps_clip: float = field(default=0.2, metadata={"help": "PPO clip range epsilon of Eq. 21"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient beta of Eq. 21"})
    temperature: float = field(default=1.0, metadata={"help": "text sampling temperature"})
    pose_temperature: float | None = field(default=None, metadata={
        "help": "pose sampling temperature tau: the pose policy is the head's Gaussian with its covariance scaled by "
                "tau^2 (sampling, ratios and KL alike); default by preset: 0.3, llava-1.5-7b 1 (the head's own "
                "spread, Eq. 2 as written)"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest sampled answer"})
    lora_rank: int = field(default=16, metadata={"help": "rank of the RFT adapter"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the RFT adapter"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    hybrid: bool = field(default=True, metadata={
        "help": "false: plain GRPO on the text only, pose = the head's mean (Fig. 4)"})
    deterministic_head: bool = field(default=False, metadata={
        "help": "Table 3: the SFT checkpoint has a mean-only head (train_sft.py --deterministic_head); poses are "
                "sampled with its fixed spread and only the mean learns"})
    zero_reward: str = field(default="", metadata={
        "help": "zero-mask one reward: joint, semantic, format or text (Table 5)"})
    joint_reward_align: str = field(default="pelvis", metadata={
        "help": "joints compared by the joint reward: pelvis (Eq. 7: pelvis-centred) or procrustes (an ablation, "
                "not the paper's: after a similarity alignment, so the global rotation earns nothing)"})
    explore_root: bool = field(default=True, metadata={
        "help": "false (an ablation, not the paper's): the global orientation's 6D is not sampled but set to the "
                "head's mean, and the pose ratio uses the marginal Gaussian of the 23 body joints"})
    pose_space: str = field(default="params", metadata={
        "help": "params (Eq. 2 as written): the pose ratio and KL of the head's Gaussian over the 144 6D parameters; "
                "rotations (ours): of its marginal over the 72 directions, at the sampling mean, in which a joint's "
                "rotation changes (the rewards cannot see the other 72, where the head's spread is tiny and the "
                "score of a sample is mostly noise)"})
    mix: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2], metadata={
        "help": "task mixture: image_to_pose, text_to_pose, vqa; 5 weights add pose_to_text and pose_edit (an SFT run "
                "trained with them)"})
    fresh_samples: bool = field(default=True, metadata={
        "help": "posebench: true draws every training sample afresh (task, pose, caption, paraphrase); false draws "
                "them from a fixed pool of n_train draws, which reaches about a third of each pose task's poses"})
    algo: str = field(default="hygrpo", metadata={
        "help": "hygrpo (the paper's), or direct (DrPose-style, ours: -R(mu + tau L eps) + beta KL by the reward's "
                "own gradient, on the same prompts, budget and beta; the text is not trained; module docstring)"})
    reasoning: bool = field(default=True, metadata={
        "help": "abstract_to_pose (--mix with 6 weights): the answers reason before the pose (CoT-Pose); false: the "
                "control answering straight with the pose; must match the SFT run's"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the loss: auto (CUDA yes, CPU no), yes, no"})
    max_bad_steps: int = field(default=5, metadata={
        "help": "abort after this many consecutive steps skipped for NaN/inf rewards, loss or gradients"})
    log_every: int = field(default=5, metadata={"help": "log every n steps"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every n steps"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "keep the newest K checkpoints (step-*/), removing older ones once a new one is written; LATEST's "
                "is never removed; 0 keeps every one"})
    eval_samples: int | None = field(default=None, metadata={
        "help": "posebench poses of eval_split for the final evaluation; default by preset: 1000, llava-1.5-7b 0"})
    eval_split: str = field(default="test", metadata={
        "help": "split of the final evaluation: test, or val for tuning (its metrics are then val/*, val_init/* and "
                "val_metrics.json)"})
    eval_generate: int = field(default=200, metadata={"help": "test prompts per task answered by greedy generation"})
    stop_after: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this many steps; 0: run all"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads per process"})
    report_to: str = field(default="none", metadata={
        "help": "also log metrics.jsonl's records to none, tensorboard, wandb or trackio (each an optional install)"})
    # real runs (--preset llava-1.5-7b): assets and datasets by path (docs/REAL_RUNS.md)
    smpl_path: str = field(default="", metadata={
        "help": "licensed SMPL model file (https://smpl.is.tue.mpg.de): joints of the joint reward and the real "
                "targets ('' : procedural; required for llava-1.5-7b)"})



@dataclass
class Args(realdata.RealDataFlags, ScriptFlags):
    """Every flag of train_rft.py: its own (ScriptFlags), then the real-data flags both training scripts share
    (realdata.RealDataFlags), in that order in --help."""

    def __post_init__(self):  # preset-dependent defaults, for the flags not given
        for k, v in PRESET_DEFAULTS.get(self.preset, PRESET_DEFAULTS["tiny"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)


SMALL = dict(steps=600, batch_size=8, lr=1e-4, eval_samples=1000, pose_temperature=0.3)
PRESET_DEFAULTS = {"tiny": SMALL, "smol": SMALL,  # Table 4:
                   "llava-1.5-7b": dict(steps=1000, batch_size=16, lr=1e-6, eval_samples=0, pose_temperature=1.0)}
POSE_SPACES = ("params", "rotations")  # --pose_space
ALGOS = ("hygrpo", "direct")  # --algo
ABSTRACT_NEW_TOKENS = 48  # --max_new_tokens at least this with abstract_to_pose in the mixture
RFT_AT_LEAST = dict(checkpoint.AT_LEAST, group_size=2, num_iterations=1, max_new_tokens=1, lora_rank=1, beta=0.0,
                    eps_clip=0.0)


# ---- ALGO: Algorithm 1, line 6 (sampling) ---------------------------------------------------


# ---- ALGO: Algorithm 1, line 7 (rewards) ----------------------------------------------------


# ---- ALGO: the log-probabilities HyGRPO needs -----------------------------------------------


@dataclass
class StepContext:
    """What one HyGRPO step needs besides the batch (built once in main, or by tools/step_timing.py)."""
    policy: object
    tokenizer: object
    opt: torch.optim.Optimizer
    params: list
    similarity: object
    retriever: object
    bodymodel: object
    loss_fn: object
    suppressed: list
    ddp: bool = False
    archetypes: object = None  # rewards.ArchetypeStats of the training split (abstract_to_pose)


def hygrpo_step(ctx: StepContext, samples, B: int, G: int, args, logged: bool = True) -> dict:
    """One step of Algorithm 1 (lines 6-9) on B prompts x G samples (`logged`: its metrics will be
    logged; plain GRPO computes the pose rewards, which no loss of it uses, only then). Returns the logged metrics
    with the time of each part, or {"skipped": what} for NaN/inf rewards ("reward"), a NaN/inf loss or
    gradient norm ("loss", "gradient": that update is not applied; with num_iterations > 1 the step's
    earlier updates stay) on any rank, or NaN/inf weights after an update ("weight", which the caller
    stops on: plumbing.apply_gradients).

    With --grad_accum N the B prompts are N micro-batches of B / N whole groups, each sampled, scored and
    read by its own forward passes; the advantages are each group's (Eq. 16, as in one batch), and the
    losses divide by the step's counts (hygrpo_loss's n_prompts, n_posed), so the one update of each
    iteration applies the gradient of the whole batch."""
    policy, device = ctx.policy, next(ctx.policy.parameters()).device
    n_micro = getattr(args, "grad_accum", 1)
    Bm = B // n_micro  # prompts per micro-batch
    parts = [samples[k * Bm * G:(k + 1) * Bm * G] for k in range(n_micro)]
    t0 = time.time()
    ros, scored, t_gen = [], [], 0.0
    for part in parts:
        t = time.time()
        policy.eval()
        ros.append(rollout.rollout(policy, ctx.tokenizer, part, args, device))  # line 6
        policy.train()
        t_gen += time.time() - t
        scored.append(rewards.score(ros[-1], part, ctx.similarity, ctx.retriever, ctx.bodymodel, args,
                                    pose_rewards=args.hybrid or logged, archetypes=ctx.archetypes))  # line 7
    t2 = time.time()
    r_d, r_c, valid = (torch.cat([s[i] for s in scored]) for i in (1, 2, 3))
    finite = bool(torch.isfinite(r_d).all() and torch.isfinite(torch.where(valid, r_c, 0.0)).all())
    if not plumbing.on_every_rank(finite, ctx.ddp, device):
        return {"skipped": "reward"}
    adv_d = hygrpo.group_advantages(r_d.view(B, G)).to(device)                          # line 8: F_i
    adv_c = hygrpo.group_advantages(r_c.view(B, G), valid=valid.view(B, G)).to(device)  # Delta_i
    pose_valid = (valid.to(device) & args.hybrid).view(B, G)  # --hybrid false: no continuous term
    refs = []
    for ro in ros:
        with torch.no_grad(), presets.reference(policy):  # pi_ref = pi_init: the SFT policy (presets.reference)
            refs.append(rollout.logprobs(policy, ro, ctx.suppressed, args.pose_temperature, args.temperature))
    t3 = time.time()
    olds = [None] * n_micro  # pi_old's log-probs of each micro-batch
    t_opt = 0.0
    bases = [rollout.pose_basis(ro, args) for ro in ros]  # None: the paper's ratio and KL over all 144 parameters
    # one batch: its own means; N micro-batches: each divides by the step's counts, and their losses add up
    norm = {} if n_micro == 1 else {"n_prompts": B, "n_posed": pose_valid.any(1).sum()}
    for _ in range(args.num_iterations):  # line 9
        ctx.opt.zero_grad(set_to_none=True)
        total, sums, stds = 0.0, None, []
        for k, ro in enumerate(ros):
            rows = slice(k * Bm, (k + 1) * Bm)
            token_logp, dist = rollout.logprobs(policy, ro, ctx.suppressed, args.pose_temperature, args.temperature)
            pose_logp = rollout.pose_log_prob(dist, ro.pose.float(), args.explore_root, bases[k])  # (N,)
            kl_c = rollout.pose_kl(dist, refs[k][1], bases[k])  # closed form, (N,)
            if olds[k] is None:  # pi_old: the sampling policy = the first iteration's forward, detached
                olds[k] = token_logp.detach(), pose_logp.detach()
            shape3 = (Bm, G, -1)
            loss, stats = ctx.loss_fn(token_logp.view(shape3), olds[k][0].view(shape3),
                                      refs[k][0].view(shape3), ro.completion_mask.view(shape3),
                                      pose_logp.view(Bm, G), olds[k][1].view(Bm, G), kl_c.view(Bm, G),
                                      pose_valid[rows], adv_d[rows], adv_c[rows], eps_clip=args.eps_clip,
                                      beta=args.beta, **norm)
            if not plumbing.on_every_rank(bool(torch.isfinite(loss)), ctx.ddp, device):
                return {"skipped": "loss"}
            loss.backward()
            total += loss.item()
            sums = stats if sums is None else {key: sums[key] + v for key, v in stats.items()}
            vk = valid[k * Bm * G:(k + 1) * Bm * G].to(device)
            stds.append(dist.stddev[vk].detach())
        t_a = time.time()
        bad, _ = plumbing.apply_gradients(ctx.opt, ctx.params, args.grad_clip, ctx.ddp, device, average=True)
        t_opt += time.time() - t_a
        if bad:
            return {"skipped": bad}
    # the losses' terms add up over the micro-batches; the fractions and the mean ratio are their means
    stats = {key: v / n_micro if n_micro > 1 and key.startswith(("clipfrac", "ratio", "approx")) else v
             for key, v in sums.items()}
    t4 = time.time()
    v = valid.float()
    # + the pose-input tasks', where a micro-batch had them
    names = list(dict.fromkeys(key for s in scored for key in s[0]))
    r = {key: torch.cat([s[0].get(key, torch.zeros(len(s[1]))) for s in scored]) for key in names}
    where = {key: torch.cat([s[4].get(key, torch.zeros(len(s[1]), dtype=torch.bool)) for s in scored]) for key in names}
    rec = {f"rewards/{k}": (x[where[k]].mean().item() if where[k].any() else None) for k, x in r.items()}
    rec.update({"rewards/discrete": r_d.mean().item(),
                "rewards/continuous": (r_c * v).sum().item() / max(1, v.sum().item()),
                **{f"losses/{k}": stats[k].item() for k in ("pg_discrete", "pg_continuous", "kl_token", "kl_pose")},
                "losses/total": total,
                "charts/clipfrac_discrete": stats["clipfrac_discrete"].item(),
                "charts/clipfrac_continuous": stats["clipfrac_continuous"].item(),
                "charts/ratio_pose_mean": stats["ratio_pose_mean"].item(),
                "charts/frac_zero_std_groups": hygrpo.frac_zero_std_groups(r_d.view(B, G)),
                "charts/frac_valid_pose": v.mean().item(),
                "charts/pose_std_mean": torch.cat(stds).mean().item() if valid.any() else None,
                "time/generate_s": t_gen, "time/rewards_s": t2 - t0 - t_gen, "time/reference_s": t3 - t2,
                "time/policy_s": t4 - t3 - t_opt, "time/optimizer_s": t_opt, "time/total_s": time.time() - t0})
    return rec


# ---- ALGO: --algo direct (DrPose-style direct reward fine-tuning; the module docstring) -----------


def direct_loss(dist, ref_dist, reward_fn, valid: torch.Tensor, B: int, G: int, beta: float,
                explore_root: bool = True, basis: torch.Tensor | None = None):
    """The direct objective: loss = -R(mu + L eps) + beta KL(pi_theta || pi_ref), averaged like HyGRPO's
    continuous term (per prompt over its V posed samples, then over the prompts with any: hygrpo.py,
    departure 3), so that beta weighs the same KL as in HyGRPO.

    Args:
        dist: the pose policy pi_theta at the <POSE> states (N rows, tempered: Sigma scaled by tau^2, so that
            rsample is mu + tau L eps, L the Cholesky factor of the head's Sigma). ref_dist: pi_ref's (no grad).
        reward_fn: (N, P) poses -> (N,) rewards, differentiable in the poses (pose_reward_differentiable).
        valid: (N,) bool, the rows with a pose (V). B, G: prompts and samples per prompt (N = B * G).
        explore_root: false: the root's 6D is the head's mean, not sampled (as rollout does).
        basis: --pose_space rotations' U (N, P, K): the KL of the marginals on U (as HyGRPO's).
    Returns:
        loss (), stats {reward, kl_pose, pose: the sample (N, P), detached}.
    """
    p = dist.rsample()  # (N, P) mu + L eps, eps ~ N(0, I): the gradient reaches mu (and L) through p
    if not explore_root:
        p = torch.cat([dist.mean[:, :model.ROOT_DIMS], p[:, model.ROOT_DIMS:]], 1)
    r = reward_fn(p)  # (N,)
    kl = rollout.pose_kl(dist, ref_dist, basis)  # (N,) closed form
    v = valid.to(p.device).view(B, G)
    mean_r = hygrpo._prompt_then_batch_mean(torch.where(v, r.view(B, G), torch.zeros_like(r.view(B, G))), v)
    mean_kl = hygrpo._prompt_then_batch_mean(torch.where(v, kl.view(B, G), torch.zeros_like(kl.view(B, G))), v)
    return -mean_r + beta * mean_kl, {"reward": mean_r.detach(), "kl_pose": mean_kl.detach(), "pose": p.detach()}


def direct_step(ctx: StepContext, samples, B: int, G: int, args, logged: bool = True) -> dict:
    """One step of --algo direct on the prompts and budget of a HyGRPO step: the same B prompts x G answers
    sampled (model.sample; the <POSE> state read after the generated text), then one policy forward with
    gradient, a reparameterised pose per answer and `direct_loss`. No token log-probability enters the loss:
    the text branch is not trained (the LoRA it shares with the pose path moves only by the pose's
    gradient). Returns the logged metrics, or {"skipped": what} as hygrpo_step."""
    policy, device = ctx.policy, next(ctx.policy.parameters()).device
    t0 = time.time()
    policy.eval()
    ro = rollout.rollout(policy, ctx.tokenizer, samples, args, device)
    policy.train()
    t1 = time.time()
    pose_task = torch.tensor([s.task in data.POSE_ANSWER_TASKS for s in samples])
    valid = ro.has_pose.cpu() & pose_task
    with torch.no_grad(), presets.reference(policy):  # pi_ref = pi_init: the SFT policy
        _, ref_dist = rollout.logprobs(policy, ro, ctx.suppressed, args.pose_temperature, args.temperature)
    t2 = time.time()
    _, dist = rollout.logprobs(policy, ro, ctx.suppressed, args.pose_temperature, args.temperature)
    where = {}

    def reward_fn(p):
        r, rows = rewards.pose_reward_differentiable(p, samples, ro.texts, ctx.retriever, ctx.bodymodel, args,
                                                     ctx.archetypes)
        where.update(rows)
        return r

    loss, stats = direct_loss(dist, ref_dist, reward_fn, valid, B, G, args.beta, args.explore_root,
                              rollout.pose_basis(ro, args))
    if not plumbing.on_every_rank(bool(torch.isfinite(loss)), ctx.ddp, device):
        return {"skipped": "loss"}
    ctx.opt.zero_grad(set_to_none=True)
    loss.backward()
    t_a = time.time()
    bad, _ = plumbing.apply_gradients(ctx.opt, ctx.params, args.grad_clip, ctx.ddp, device, average=True)
    t_opt = time.time() - t_a
    if bad:
        return {"skipped": bad}
    rec = {"rewards/format": rewards.format_reward(ro.texts, [s.task for s in samples],
                                                   [s.answer for s in samples]).mean().item(),
           "rewards/text": None, "rewards/continuous": stats["reward"].item(),
           "losses/direct_reward": -stats["reward"].item(), "losses/kl_pose": stats["kl_pose"].item(),
           "losses/total": loss.item(), "charts/frac_valid_pose": valid.float().mean().item(),
           "charts/pose_std_mean": dist.stddev[valid.to(device)].mean().item() if valid.any() else None,
           "time/generate_s": t1 - t0, "time/reference_s": t2 - t1, "time/policy_s": time.time() - t2 - t_opt,
           "time/optimizer_s": t_opt, "time/total_s": time.time() - t0}
    if logged:  # the rewards by name, of the sampled poses (Eq. 7 and 8 as HyGRPO logs them)
        with torch.no_grad():
            r, _ = rewards.pose_reward_differentiable(stats["pose"], samples, ro.texts, ctx.retriever, ctx.bodymodel,
                                                      args,
                                                      ctx.archetypes)
        for name, key in (("joint", "joint"), ("semantic", "semantic"), ("abstract_pose", "abstract")):
            m = where.get(key, torch.zeros(len(samples), dtype=torch.bool)) & valid
            rec[f"rewards/{name}"] = r.cpu()[m].mean().item() if m.any() else None
    return rec


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.group_size < 2:
        raise SystemExit(f"--group_size {args.group_size}: group normalisation (Eq. 16) needs G >= 2")
    checkpoint.check_args(args, "train_rft.py", RFT_AT_LEAST, checkpoint.POSITIVE + ("temperature", "pose_temperature"))
    reward_names = rewards.REWARD_NAMES + rewards.POSE_INPUT_REWARD_NAMES + rewards.ABSTRACT_REWARD_NAMES
    if args.zero_reward and args.zero_reward not in reward_names:
        raise SystemExit(f"--zero_reward {args.zero_reward}: expected one of {', '.join(reward_names)}")
    if args.joint_reward_align not in rewards.JOINT_ALIGNMENTS:
        raise SystemExit(f"--joint_reward_align {args.joint_reward_align}: expected one of "
                         f"{', '.join(rewards.JOINT_ALIGNMENTS)}")
    if args.algo not in ALGOS:
        raise SystemExit(f"--algo {args.algo}: expected one of {', '.join(ALGOS)}")
    if args.algo == "direct" and (not args.hybrid or args.deterministic_head):
        raise SystemExit("--algo direct trains the pose by the reward's gradient through the head's reparameterised "
                         "sample: it has no --hybrid false (no pose) nor --deterministic_head variant")
    if args.algo == "direct" and args.grad_accum > 1:
        raise SystemExit("--algo direct reads the step's batch in one pass; --grad_accum is HyGRPO's (pass 1)")
    abstract_on = data.trains_abstract(args.mix)
    if abstract_on and args.max_new_tokens < ABSTRACT_NEW_TOKENS:
        raise SystemExit(f"--max_new_tokens {args.max_new_tokens}: abstract_to_pose's answers (a caption, then the "
                         f"pose) take up to about 45 tokens; pass --max_new_tokens {ABSTRACT_NEW_TOKENS}")
    if args.pose_space not in POSE_SPACES:
        raise SystemExit(f"--pose_space {args.pose_space}: expected one of {', '.join(POSE_SPACES)}")
    if args.preset not in presets.PRESETS:
        raise SystemExit(f"--preset {args.preset}: train_rft.py knows {', '.join(presets.PRESETS)}")
    real = args.preset == "llava-1.5-7b"
    if real and abstract_on:
        raise SystemExit("train_rft.py: abstract_to_pose (--mix with 6 weights) is posebench's; the real-data mixture "
                         "has none")
    if real and realdata.real_pose_input(args):
        raise SystemExit("train_rft.py: --real_mix with 6 weights: the pose-input tasks on real data are trained by "
                         "train_sft.py only; their RFT rewards (a one-sentence caption's format, posebench's posecode "
                         "phrases) are posebench's. Pass --real_mix with 4 weights")
    tasks = realdata.preflight_real(args, "rft", args.seed + 1) if real else None  # before any write
    ddp, rank, world, device = plumbing.setup_distributed()
    master = rank == 0
    plumbing.check_batch(args.batch_size, world, args.grad_accum)
    torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    evaluating = not real and args.eval_samples > 0
    for flag in ("reward_retriever",) + (("eval_retriever",) if evaluating else ()):
        try:  # before any work: the files only (the models load where they did, for the same random streams)
            trained_on = retrieval.check_retriever(getattr(args, flag))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--{flag}: {e}") from None
        if real and master and trained_on.get("bench_key"):
            print(f"warning: --{flag} {getattr(args, flag)} was trained on posebench ({trained_on['train_poses']}), so "
                  "the semantic reward (Eq. 8) scores real captions out of domain; train it on PoseScript: "
                  "`python retrieval.py --posescript_dir ... --amass_dir ... --smpl_path ...`")
    sft_step = None if args.resume else checkpoint.run_step(args.sft_dir, "--sft_dir")
    sft_bench = {} if real or sft_step is None else checkpoint.trained_args(sft_step)
    if sft_bench.get("reasoning", True) != args.reasoning:
        raise SystemExit(f"--reasoning {str(args.reasoning).lower()}: the SFT run {args.sft_dir} was trained with "
                         f"--reasoning {str(sft_bench['reasoning']).lower()}; pass that")
    if sft_bench.get("n_train", args.n_train) != args.n_train:
        raise SystemExit(f"--n_train {args.n_train}: the SFT run {args.sft_dir} was trained on the benchmark of "
                         f"--n_train {sft_bench['n_train']}, whose poses and prompts RFT must use too; pass --n_train "
                         f"{sft_bench['n_train']} (or an SFT run of that benchmark)")
    checkpoint.prepare_out_dir(args.out_dir, args.resume, master)
    t_start = time.time()

    log = plumbing.make_logger(args.out_dir, master, args.report_to, args)

    # ---- BOILERPLATE: pi_init (the SFT adapter frozen) + a fresh adapter; rewards' models; data
    if args.resume:
        step_dir = checkpoint.run_step(args.out_dir, "--out_dir", resume=True)
        policy, tokenizer, step_dir = presets.load_policy(args.out_dir, args.preset, trainable=True, step_dir=step_dir)
        state = checkpoint.load_train_state(step_dir)
    else:  # pi_init = pi_ref = the SFT policy bit for bit: its adapter frozen beside a fresh one (presets.rft_policy)
        if master:
            # base/ -> the SFT run's, reference/: its adapter
            presets.write_rft_start(args.sft_dir, sft_step, args.out_dir)
        torch.manual_seed(args.seed)  # the adapter's init, the same on every rank
        policy, tokenizer = presets.rft_policy(args.sft_dir, sft_step, args.preset, args.lora_rank, args.lora_alpha)
        state = None
    torch.manual_seed(args.seed + rank)  # sampling differs by rank
    policy.to(device).train()
    inner = policy.get_base_model()
    if plumbing.use_gradient_checkpointing(args):
        presets.enable_gradient_checkpointing(inner)
    if inner.config.pose_head_deterministic != args.deterministic_head:
        have = "a deterministic (mean-only)" if inner.config.pose_head_deterministic else "a distributional"
        raise SystemExit(f"{args.sft_dir} has {have} pose head; pass --deterministic_head "
                         f"{str(inner.config.pose_head_deterministic).lower()} or use a matching SFT checkpoint")
    retriever = retrieval.load_retriever(args.reward_retriever, device)
    similarity = rewards.TextSimilarity(args.text_encoder, str(device))
    bodymodel = body.BodyModel(args.smpl_path or None).to(device)
    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    if not real:  # (real: the same --smpl_path body makes the targets' joints and scores the poses, Eq. 7)
        tasks = data.PoseBenchTasks("train", cfg, tasks=data.mix_tasks(args.mix), mix=args.mix,
                                    seed=args.seed + 1,  # other prompts than SFT's order
                                    length=data.FRESH_DRAWS if args.fresh_samples else None, reasoning=args.reasoning)
        # the training captions' sentence embeddings, as the retriever was trained on them: no encoder call
        # for a text-to-pose caption in the step (Eq. 8 then costs the retriever's two MLPs)
        retriever.know_sentences(sentences.caption_table(tasks.data, posebench.config_key(cfg),
                                                         retriever.cfg.text_encoder, retriever.cfg.encoder_bf16))
    names, params = checkpoint.trainable_params(policy, state)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    loss_fn = hygrpo.make_loss({"auto": None, "yes": True, "no": False}[args.compile])
    start = checkpoint.restore_train_state(opt, state, args, rank, world) if state is not None else 0
    bad = 0
    B, G = args.batch_size // world, args.group_size  # prompts on this rank; whole groups per rank
    suppressed = rollout.suppressed_tokens(policy, tokenizer)

    # ---- ALGO: Algorithm 1, lines 4-10
    from tqdm import tqdm
    ctx = StepContext(policy, tokenizer, opt, params, similarity, retriever, bodymodel, loss_fn, suppressed, ddp,
                      rewards.ArchetypeStats(tasks.data) if abstract_on else None)
    step_fn = direct_step if args.algo == "direct" else hygrpo_step
    batches = plumbing.step_loader(tasks, args, start, rank, world, args.seed)  # a step's prompts: its (seed, step)
    for step in tqdm(range(start, args.steps), desc="RFT", disable=None if master else True,
                     initial=start, total=args.steps):
        prompts = [s for _ in range(args.grad_accum) for s in next(batches)]  # line 5: the step's B, micro-batch-major
        samples = [s for s in prompts for _ in range(G)]  # (B * G) rows, prompt-major
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, args.steps, args.lr, args.warmup_steps)
        done = step + 1
        logged = done % args.log_every == 0 or done == args.steps
        rec = step_fn(ctx, samples, B, G, args, logged)  # lines 6-9 (--algo direct: direct_step)
        # a skipped step: no update; the step still counts (and saves when due)
        bad = checkpoint.count_bad_step(bad, rec.get("skipped"), done, args, log)
        if "skipped" not in rec and logged:
            log({**rec, "charts/lr": opt.param_groups[0]["lr"], **plumbing.gpu_peak(device)}, done)
        stop = args.stop_after and done >= args.stop_after
        if done % args.save_every == 0 or done == args.steps or stop:  # every rank takes part
            checkpoint.save_checkpoint(args.out_dir, done, policy, opt, args, names, ddp, master)
        if stop:
            break

    if master:
        figures.plot_rewards(os.path.join(args.out_dir, "metrics.jsonl"),
                             os.path.join(args.out_dir, "reward_curves.png"),
                             "direct reward fine-tuning" if args.algo == "direct" else
                             f"HyGRPO rewards ({'hybrid' if args.hybrid else 'GRPO, text only'})")
    if master and real:
        print(f"RFT done in {time.time() - t_start:.0f} s; no posebench evaluation for llava-1.5-7b "
              "(docs/REAL_RUNS.md: `python evaluate.py --preset llava-1.5-7b --ckpt DIR --eval_npz ... "
              "--posescript_dir ...`)")
    if not real and args.eval_samples > 0 and not (args.stop_after and args.stop_after < args.steps):
        # evaluate.py's code path, sharded over the ranks; every rank gets the same metrics
        train = posebench.load_split("train", cfg)
        test_tasks = data.PoseBenchTasks(args.eval_split, cfg, seed=args.seed)
        evaluator = retrieval.load_retriever(args.eval_retriever, device)
        def evaluate():
            return evaluate_policy(policy, tokenizer, test_tasks, train, bodymodel, device, args.eval_samples,
                                   n_generate=args.eval_generate, similarity=similarity,
                                   retrievers={"eval": evaluator, "reward": retriever},
                                   abstract_reasoning=args.reasoning if abstract_on else None)
        res = evaluate()
        with presets.reference(policy):  # pi_init = the SFT model, by the same evaluation
            init = evaluate()
        split = args.eval_split  # test/*, or val/* when tuning: never a val number under a test name
        log({**{f"{split}/{k}": v for k, v in res.items()}, **{f"{split}_init/{k}": v for k, v in init.items()}},
            args.steps)
        if master:
            plumbing.atomic_write(os.path.join(args.out_dir, f"{split}_metrics.json"),
                                  lambda fh: json.dump({"rft": res, "sft": init}, fh, indent=1))
            print(f"\nRFT done in {time.time() - t_start:.0f} s. {args.eval_split} split ({args.eval_samples} poses), "
                  "SFT -> RFT:")
            num = lambda v: "       -" if v is None else f"{v:8.2f}"  # noqa: E731
            for k in res:
                if "mean_pose" not in k and "reward_retriever" not in k and "/random/" not in k:
                    print(f"  {k:48s} {num(init[k])} -> {num(res[k])}")
    log.close()  # the --report_to tracker
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except realdata.DataFormatError as e:  # a dataset file that does not follow its schema: named, no traceback
        raise SystemExit(f"{os.path.basename(__file__)}: {e}") from None

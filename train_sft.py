"""Supervised fine-tuning of PoseLlava: the starting point of Pose-RFT (App. D, Table 4).

Stage 0 (built-in presets only; the paper starts from pretrained parts instead): stage0.py pretrains
the pose-aware ViT, the CLIP tower and the tiny LM once per benchmark, configuration and seed, and
caches them; then both encoders are frozen, as in the paper (§4.1).
Stage 1, SFT on the benchmark mixture (image-to-pose, text-to-pose, VQA): cross-entropy on the
answer tokens + a pose loss at `<POSE>`, all in parameter space (the paper's point is that SFT
optimises a parameter-space target): the head's mean regresses the target action p by
an L2 on 6D (ChatPose/PoseLLaVA-style), and the covariance is fitted by the Gaussian negative
log-likelihood of p at the detached mean (beta-NLL with beta = 1, Seitzer et al. 2022); the
deterministic head (Table 3's baseline) has the L2 alone. An L2 on joints is a flag, off by
default. LoRA on the LM, projectors and pose head trained fully; AdamW betas (0.9, 0.95), cosine
schedule (Table 4). Then the head alone is fitted on cached `<POSE>` states (`fit_head`).

The paper's configuration is `--preset llava-1.5-7b`: LLaVA-1.5-7B (--llava_path) and HMR2.0's ViT-H
(--hmr2_ckpt) instead of stage 0, bf16 with gradient checkpointing, and the real datasets given by
their flags (--posescript_dir + --amass_dir, --image_npz, --bedlam_script_dir + --bedlam_img_dir,
--llava_instruct_json + --coco_dir; with --real_mix of 6 weights also the neighbours' pose-input tasks,
--posefix_dir for editing and PoseScript's captions for pose-to-text) instead of the built-in benchmark.
Every asset and data file is
opened and checked before anything is built or written (`realdata.preflight_real`); one message names every
problem with its flag, file, record and fix.

Defaults by preset (applied only to flags not given): --steps, --batch_size, --lr and
--eval_samples are 1200 / 32 / 1e-3 / 1000 for tiny and smol, and Table 4's 10000 / 80 / 3e-4
(and no posebench evaluation) for llava-1.5-7b.

Departures:
  1. Stage 0 exists only because nothing pretrained can be downloaded here.
  2. The small presets use sizes a 2-core CPU finishes in minutes; the real-data mixture weights
     (--real_mix) are ours (the paper gives none).
  3. The paper does not spell out its SFT pose loss. A plain NLL (`--nll_trains_mean`) lets the
     head park hard dimensions under a large variance instead of learning their mean (its gradient
     on each mean is scaled by the inverse variance); here the mean is regressed and the NLL fits
     the covariance around it.
  4. The head fit after stage 1 (`--head_fit_steps`, 0 turns it off) is ours: stage 1 sees each
     training pose about once on the tiny preset (the LM forward is the cost); the head is cheap,
     and refitting it on cached `<POSE>` states of 12,000 training samples, standardised per
     dimension, reads what the states carry (first measured on the earlier, blind miniature:
     docs/FINDINGS.md, finding 1; the standardisation and the tiny preset's 512-wide head MLPs:
     docs/RESULTS.md, "How the head came to read").
  5. Stage 0's recipe (stage0.py: convolutional stem, mean-token readout of joints and 6D) is ours:
     with a plain ViT read through all its tokens the policy did not see the image
     (docs/RESULTS.md, "How the policy came to see").

Run:
    python train_sft.py                                   # tiny preset, CPU, a few minutes
    torchrun --nproc_per_node=8 train_sft.py --preset smol  # DDP: one code path, RANK switches it on
    python train_sft.py --resume                          # continue exactly from the last checkpoint
    python train_sft.py --mix 0.3 0.3 0.2 0.1 0.1         # + pose_to_text, pose_edit (pose as input)
    python train_sft.py --mix 0.4 0.4 0.2 0 0 0.4         # + abstract_to_pose (CoT-Pose; --reasoning false)
    torchrun --nproc_per_node=8 train_sft.py --preset llava-1.5-7b --llava_path ... --hmr2_ckpt ... \
        --posescript_dir ... --amass_dir ... --image_npz MPI-INF-3DHP=...   # docs/REAL_RUNS.md
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import body
import checkpoint
import data
import vocab
from checkpoint import prepare_out_dir, restore_train_state, save_checkpoint, trainable_params
import model
import plumbing
import posebench
import posevit
import presets
import realdata
import stage0
from evaluate import evaluate_policy


@dataclass
class ScriptFlags:
    preset: str = field(default="tiny", metadata={
        "help": "tiny (CPU, random init + stage 0), smol (SmolLM2-135M) or llava-1.5-7b (the paper's; needs the asset "
                "and data flags below)"})
    out_dir: str = field(default="ckpt/sft", metadata={"help": "checkpoints, metrics.jsonl and the final model"})
    seed: int = field(default=0, metadata={"help": "seed; rank r uses seed + r for sampling"})
    resume: bool = field(default=False, metadata={"help": "continue exactly from out_dir's latest checkpoint"})
    # benchmark
    n_train: int = field(default=20000, metadata={"help": "posebench training poses"})
    n_val: int = field(default=1000, metadata={"help": "posebench validation poses"})
    n_test: int = field(default=1000, metadata={"help": "posebench test poses"})
    # stage 0
    stage0_pose_epochs: float = field(default=8.0, metadata={"help": "pose-ViT pretraining epochs (joint regression)"})
    stage0_readout: str = field(default="mean", metadata={
        "help": "stage-0 pose readout: mean (the mean token -> MLP: what <POSE> can read through attention) or "
                "flatten (every token -> linear, the earlier recipe)"})
    stage0_rot6d_weight: float = field(default=1.0, metadata={
        "help": "stage-0 pose readout: also regress the view-frame 6D pose (the pose head's target) with this "
                "weight on its L1 (0: joints only)"})
    stage0_pose_lr: float = field(default=2e-3, metadata={"help": "pose-ViT pretraining peak learning rate"})
    stage0_only: bool = field(default=False, metadata={
        "help": "run stage 0 (or find it in the cache), print the encoder's val/test MPJPE, write them to "
                "out_dir/stage0.json and exit; report.py runs it once per seed before the SFT runs that share it"})
    stage0_clip_epochs: float = field(default=1.0, metadata={"help": "CLIP-tower contrastive pretraining epochs"})
    stage0_lm_steps: int = field(default=300, metadata={"help": "tiny LM pretraining steps on benchmark text"})
    stage0_lm_batch: int = field(default=64, metadata={"help": "tiny LM pretraining batch (texts)"})
    stage0_lr: float = field(default=1e-3, metadata={"help": "stage-0 learning rate of the CLIP tower and the LM"})
    stage0_batch: int = field(default=128, metadata={"help": "stage-0 batch size"})
    # stage 1 (SFT)
    steps: int | None = field(default=None, metadata={
        "help": "SFT steps; default by preset: 1200, llava-1.5-7b 10000 (Table 4)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "global batch; default by preset: 32, llava-1.5-7b 80 (Table 4)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step, N: each process runs --batch_size / (processes x N) samples at a "
                "time and one step applies their summed gradient, so the global batch stays --batch_size (fewer "
                "GPUs or less memory: raise N; tools/gpu_memory.py --grad_accum N says what fits)"})
    num_workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes reading and cropping the samples (0: the main process); the samples "
                "are the same whatever the number"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate; default by preset: 1e-3, llava-1.5-7b 3e-4 (Table 4)"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per training sample, longer answers cut (data.collate); default by preset: 0 (no cut: "
                "posebench's are short), llava-1.5-7b 2048 (LLaVA-1.5's model_max_length)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank on the LM"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    head_rank: int = field(default=4, metadata={
        "help": "rank R of the pose covariance's low-rank factor (0: diagonal)"})
    deterministic_head: bool = field(default=False, metadata={"help": "Table 3 baseline: mean-only head, L2 pose loss"})
    pose_nll_weight: float = field(default=1.0, metadata={
        "help": "weight of the Gaussian NLL (per pose dim) at <POSE>"})
    nll_trains_mean: bool = field(default=False, metadata={
        "help": "let the NLL's gradient reach the mean too; by default the NLL fits the covariance at the detached "
                "mean and the mean is regressed by the 6D L2 (a plain NLL scales each dimension's mean gradient by "
                "its inverse variance, so the head parks hard dimensions under a large variance)"})
    l2_6d_weight: float = field(default=1.0, metadata={"help": "weight of an L2 on the 6D mean (parameter regression)"})
    l2_joints_weight: float = field(default=0.0, metadata={
        "help": "weight of an L2 on joints from the mean (off by default)"})
    head_fit_steps: int = field(default=8000, metadata={
        "help": "after SFT on the built-in benchmark: fit the pose head alone for this many steps on cached <POSE> "
                "states (0: off; never on llava-1.5-7b)"})
    head_fit_samples: int = field(default=12000, metadata={
        "help": "training poses whose <POSE> states the head fit uses"})
    head_fit_batch: int = field(default=256, metadata={"help": "batch of the head fit"})
    head_fit_joints_weight: float = field(default=0.3, metadata={
        "help": "weight of an L2 on the joints (m^2: squared distance, mean over joints) of the head's mean in the "
                "head fit, beside its 6D losses: where a joint is, not only how it turns (0: the 6D losses alone)"})
    mix: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2], metadata={
        "help": "task mixture weights: image_to_pose, text_to_pose, vqa; 5 weights add pose_to_text and pose_edit "
                "(pose as input: the extended vocabulary and the pose encoder, data.POSE_INPUT_TASKS); 6 add "
                "abstract_to_pose (CoT-Pose's abstract prompts, data.ABSTRACT_TASK)"})
    reasoning: bool = field(default=True, metadata={
        "help": "abstract_to_pose (--mix with 6 weights): the answer reasons (a caption of the pose) before the pose, "
                "CoT-Pose; false: the control that answers straight with the pose"})
    fresh_samples: bool = field(default=True, metadata={
        "help": "posebench: true draws every training sample afresh (task, pose, caption, paraphrase); false draws "
                "them from a fixed pool of n_train draws, which reaches about a third of each pose task's poses"})
    log_every: int = field(default=50, metadata={"help": "log metrics every n steps"})
    save_every: int = field(default=400, metadata={"help": "checkpoint every n steps"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "keep the newest K checkpoints (step-*/), removing older ones once a new one is written; LATEST's "
                "is never removed; 0 keeps every one"})
    eval_samples: int | None = field(default=None, metadata={
        "help": "posebench test poses of the final evaluation; default by preset: 1000, llava-1.5-7b 0 (none)"})
    eval_generate: int = field(default=200, metadata={"help": "test prompts per task answered by greedy generation"})
    stop_after: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this many steps; 0: run all"})
    max_bad_steps: int = field(default=5, metadata={
        "help": "abort after this many consecutive steps skipped for a NaN/inf loss or gradient"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads per process"})
    report_to: str = field(default="none", metadata={
        "help": "also log metrics.jsonl's records to none, tensorboard, wandb or trackio (each an optional install)"})
    # real runs (--preset llava-1.5-7b): assets and datasets by path (docs/REAL_RUNS.md)
    llava_path: str = field(default="", metadata={"help": f"LLaVA-1.5-7B directory: {presets.LLAVA_SOURCE}"})
    hmr2_ckpt: str = field(default="", metadata={"help": f"HMR2.0 checkpoint, f_b's weights: {posevit.HMR2_SOURCE}"})
    smpl_path: str = field(default="", metadata={
        "help": "licensed SMPL model file for the real targets' joints (https://smpl.is.tue.mpg.de; '' : procedural)"})



@dataclass
class Args(realdata.RealDataFlags, ScriptFlags):
    """Every flag of train_sft.py: its own (ScriptFlags), then the real-data flags both training scripts share
    (realdata.RealDataFlags), in that order in --help."""

    def __post_init__(self):  # preset-dependent defaults, for the flags not given
        for k, v in PRESET_DEFAULTS.get(self.preset, PRESET_DEFAULTS["tiny"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)


SMALL = dict(steps=1200, batch_size=32, lr=1e-3, eval_samples=1000, max_length=0)
PRESET_DEFAULTS = {"tiny": SMALL, "smol": SMALL,
                   "llava-1.5-7b": dict(steps=10000, batch_size=80, lr=3e-4, eval_samples=0,
                                        max_length=2048)}  # Table 4


# SFT's flags that need >= a minimum, beside those of every training script (checkpoint.AT_LEAST)
SFT_AT_LEAST = dict(checkpoint.AT_LEAST, stage0_pose_epochs=0.0, stage0_clip_epochs=0.0, stage0_lm_steps=0,
                    stage0_lm_batch=1,
                    stage0_batch=1, head_rank=0, head_fit_steps=0, head_fit_samples=2, head_fit_batch=1,
                    pose_nll_weight=0.0, l2_6d_weight=0.0, l2_joints_weight=0.0, stage0_rot6d_weight=0.0)


def pose_input_on(args) -> bool:
    """The pose-input tasks are in the mixture (--mix with 5 weights; llava-1.5-7b: --real_mix with 6): the
    tiny preset then speaks the extended vocabulary, and every preset's model has the pose encoder."""
    if args.preset == "llava-1.5-7b":
        return realdata.real_pose_input(args)
    return len(args.mix) >= len(data.ALL_TASKS)


def abstract_on(args) -> bool:
    """--mix with 6 weights: abstract_to_pose is in the mixture (the tiny preset's vocabulary extended further)."""
    return len(args.mix) == len(data.MIX_TASKS)


BASE_FLAGS = "built_by.json"  # in base/: the flags that shaped it


def base_flags(args) -> dict:
    """The flags that shape base/: the preset, the pose head, the benchmark, the seed and (built-in
    presets) stage 0's flags; for llava-1.5-7b the asset paths."""
    keys = ["preset", "head_rank", "deterministic_head", "n_train", "n_val", "n_test", "seed"]
    keys += ["llava_path", "hmr2_ckpt"] if args.preset == "llava-1.5-7b" else \
        sorted(k for k in vars(args) if k.startswith("stage0_") and k != "stage0_only")
    return {k: getattr(args, k) for k in keys} | ({"pose_input": True} if pose_input_on(args) else {}) | (
        {"abstract": True} if abstract_on(args) else {})


def check_base_flags(base_dir: str, built: dict) -> None:
    """Stop when base/ was built with other shaping flags than this run's (a failed earlier run in the
    same --out_dir leaves its base/, which would otherwise be trained silently)."""
    path = os.path.join(base_dir, BASE_FLAGS)
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        raise SystemExit(f"{base_dir} holds a base model without a readable {BASE_FLAGS} (it was built by an older "
                         f"version, or the file is damaged): delete {base_dir} to build it again with these flags")
    changed = [f"--{k} {old.get(k)!r} -> {v!r}" for k, v in built.items() if old.get(k) != v]
    if changed:
        raise SystemExit(f"{base_dir} was built with other flags than this run's ({'; '.join(changed)}): delete "
                         f"{base_dir} to build it again, or pass the flags it was built with")


def build_base(args, cfg: posebench.BenchConfig):
    """The built-in presets' untrained base: (model with the run's pose head, `build()` that makes
    one with the Gaussian head for stage 0, tokenizer)."""
    pose_input = pose_input_on(args)
    if args.preset == "tiny":
        tokenizer = vocab.tiny_tokenizer(cfg, pose_input=pose_input, abstract=abstract_on(args))
        return (presets.build_tiny(tokenizer, rank=args.head_rank, deterministic=args.deterministic_head),
                lambda: presets.build_tiny(tokenizer, rank=args.head_rank), tokenizer)
    base, tokenizer = presets.build_smol(rank=args.head_rank, deterministic=args.deterministic_head,
                                         pose_input=pose_input)
    return base, lambda: presets.build_smol(rank=args.head_rank, pose_input=pose_input)[0], tokenizer


# ---- stage 1: the SFT objective -------------------------------------------------------------

def sft_loss(logits, labels, pose_dist, batch: data.Batch, args, n_tokens: float, n_poses: float, bodymodel=None):
    """Cross-entropy on answer tokens + the pose loss at `<POSE>`, as sums divided by the
    GLOBAL counts n_tokens and n_poses (so that gradients summed over ranks equal one process's).

    Args:
        logits (B, T, V), labels (B, T) with -100 outside answers; pose_dist over (B, P).
    Returns:
        loss (scalar), stats (dict of floats).
    """
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="sum") / n_tokens
    valid = batch.pose_valid
    target = batch.pose6d.reshape(len(valid), -1)  # (B, P)
    pose, l2_6d = pose_loss(pose_dist, target, valid, args, n_poses)
    l2_joints = logits.new_zeros(())
    if args.l2_joints_weight and valid.any():
        l2_joints = joints_sq_error(bodymodel, pose_dist.mean[valid], batch.joints[valid]).sum() / n_poses
    loss = ce + pose + l2_6d + args.l2_joints_weight * l2_joints
    stats = {"losses/ce": ce, "losses/pose": pose, "losses/l2_6d": l2_6d, "losses/l2_joints": l2_joints}
    return loss, {k: float(v.detach()) for k, v in stats.items()}


def joints_sq_error(bodymodel, pose6d: torch.Tensor, target_joints: torch.Tensor) -> torch.Tensor:
    """(B,) squared distance of each joint of the poses (B, 144) from its pelvis-centred target
    (B, 24, 3), averaged over joints; the joints through the kinematic tree (`joints_rot6d`)."""
    j = bodymodel.joints_rot6d(pose6d)
    return ((j - j[:, :1] - target_joints) ** 2).sum(-1).mean(-1)


def pose_loss(pose_dist, target, valid, args, n_poses: float):
    """The parameter-space pose loss at `<POSE>`, weighted: (NLL term, L2-on-6D term).

    The mean regresses the target action p (L2 on 6D, mean over the P dims); the covariance is
    fitted by the NLL of p at the detached mean (beta-NLL, beta = 1), or at the live mean with
    `--nll_trains_mean`. The deterministic head has the L2 alone. Sums over the valid rows / n_poses.
    Args: pose_dist over (B, P); target (B, P); valid (B,) bool.
    """
    l2_6d = ((pose_dist.mean - target) ** 2).mean(-1)[valid].sum() / n_poses
    if args.deterministic_head:  # Table 3 baseline: regress the parameters
        return l2_6d.new_zeros(()), l2_6d
    if not args.nll_trains_mean:
        pose_dist = model.detach_mean(pose_dist)
    nll = (-pose_dist.log_prob(target) / target.shape[-1])[valid].sum() / n_poses
    return args.pose_nll_weight * nll, args.l2_6d_weight * l2_6d


@torch.no_grad()
def pose_states(policy, tokenizer, samples, device, batch_size: int = 128):
    """The teacher-forced `<POSE>` states of pose samples and their 6D targets: (N, D) float32 and
    (N, P), on `device` (for fit_head, and for tools/probe.py)."""
    n_img = policy.get_base_model().num_image_tokens
    states, targets = [], []
    for i in range(0, len(samples), batch_size):
        b = data.collate(samples[i:i + batch_size], tokenizer, n_img).to(device)
        _, _, h = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos,
                                        pose_values=b.pose_values)
        states.append(h.float())
        targets.append(b.pose6d.reshape(len(h), -1))
    return torch.cat(states), torch.cat(targets)


def fit_head(policy, tokenizer, tasks: data.PoseBenchTasks, args, device, log, bodymodel):
    """Fit the pose head alone on cached `<POSE>` states of training poses, with the SFT pose loss
    and an L2 on the joints of the head's mean (`--head_fit_joints_weight`).

    Stage 1 sees each training pose about once on the tiny preset (the LM forward is the cost);
    the head is cheap, and refitting it for many epochs on the final states is what lets it read
    the view orientation that the states do carry (measured: a linear probe of the states beat the
    stage-1 head by 70 mm MPJPE on val). The fit reads the states standardised per dimension (their
    means are up to 2.5 x their spread: one learning rate fits raw states badly) by re-expressing the
    first layer of each MLP for the standardised input, and folds the standardisation back after, so
    the head is the same module reading the raw states (`fold_standardisation`).
    The joint term weighs each rotation by how far it moves the body: the 6D L2 weighs the root,
    which turns all 24 joints, as one joint of 24 (measured in offline fits, val: 117.0 -> 109.5 mm
    at weight 0.3; a larger weight gives up the root's twist: docs/RESULTS.md, "The head fit in
    joint space"). Its targets are the joints of the 6D targets (`body.BodyModel.joints_rot6d`, the
    kinematic tree alone: cheap).
    """
    fit = [t for t in data.POSE_ANSWER_TASKS if t in data.POSE_TASKS or t in tasks.tasks]  # + pose_edit, if trained
    per_task = args.head_fit_samples // len(fit)
    samples = [s for t in fit for s in tasks.eval_samples(t)[:per_task]]
    policy.eval()
    states, targets = pose_states(policy, tokenizer, samples, device)
    policy.train()
    wj = args.head_fit_joints_weight
    if wj:
        with torch.no_grad():
            joints = torch.cat([bodymodel.joints_rot6d(targets[i:i + 1024]) for i in range(0, len(targets), 1024)])
            joints = (joints - joints[:, :1]).float()
    head = policy.get_base_model().pose_head
    params = [p for p in head.parameters() if p.requires_grad]
    shift, scale = states.mean(0), states.std(0).clamp_min(1e-6)
    states = (states - shift) / scale
    inner = presets.trained_pose_head(policy)
    firsts = [m[0] for m in (inner.mlp, getattr(inner, "cov_mlp", None)) if m is not None]
    fold_standardisation(firsts, shift, scale, into=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 2)
    for step in range(args.head_fit_steps):
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, args.head_fit_steps, args.lr, 0)
        idx = torch.randint(len(states), (args.head_fit_batch,), generator=g).to(device)
        loss, stats = head_fit_loss(head.distribution(states[idx]), targets[idx], joints[idx] if wj else None,
                                    args, bodymodel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == args.head_fit_steps:
            log({**stats, "head_fit/step": step + 1})
    fold_standardisation(firsts, shift, scale, into=False)


def head_fit_loss(dist, target, target_joints, args, bodymodel):
    """The head fit's loss on a batch: the SFT pose loss (`pose_loss`) + `--head_fit_joints_weight` x
    the squared distance of each joint of the head's mean from its target, averaged over joints and
    poses (pelvis-relative; target_joints (B, 24, 3), None when the weight is 0). Returns (loss, stats)."""
    valid = torch.ones(len(target), dtype=torch.bool, device=target.device)
    nll, l2_6d = pose_loss(dist, target, valid, args, len(target))
    l2_joints = l2_6d.new_zeros(())
    if args.head_fit_joints_weight:
        l2_joints = joints_sq_error(bodymodel, dist.mean, target_joints).mean()
    stats = {"head_fit/pose": nll.item(), "head_fit/l2_6d": l2_6d.item(), "head_fit/l2_joints": l2_joints.item()}
    return nll + l2_6d + args.head_fit_joints_weight * l2_joints, stats


@torch.no_grad()
def fold_standardisation(layers, shift: torch.Tensor, scale: torch.Tensor, into: bool) -> None:
    """Re-express linear layers reading h for the standardised input z = (h - shift) / scale
    (`into`), or back for h: W h + b = (W * scale) z + (b + W shift). The function is unchanged."""
    for lin in layers:
        if into:
            lin.bias += lin.weight @ shift
            lin.weight *= scale
        else:
            lin.weight /= scale
            lin.bias -= lin.weight @ shift


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.preset not in presets.PRESETS:
        raise SystemExit(f"--preset {args.preset}: train_sft.py knows {', '.join(presets.PRESETS)}")
    checkpoint.check_args(args, "train_sft.py", SFT_AT_LEAST, checkpoint.POSITIVE + ("stage0_lr", "stage0_pose_lr"))
    real = args.preset == "llava-1.5-7b"
    if real and len(args.mix) > len(data.TASKS):
        raise SystemExit("train_sft.py: --mix with 5 or 6 weights: the posebench tasks; with llava-1.5-7b the "
                         "pose-input tasks are real data: --real_mix with 6 weights and --posefix_dir")
    # every real input checked: before any write
    tasks = realdata.preflight_real(args, "sft", args.seed) if real else None
    if args.stage0_readout not in ("mean", "flatten"):
        raise SystemExit(f"--stage0_readout {args.stage0_readout}: expected mean or flatten")
    if not (args.deterministic_head or args.nll_trains_mean or args.l2_6d_weight > 0):
        raise SystemExit("--l2_6d_weight 0 leaves the pose head's mean untrained (the NLL fits only the covariance); "
                         "pass --nll_trains_mean true to train the mean by the NLL instead")
    ddp, rank, world, device = plumbing.setup_distributed()
    master = rank == 0
    torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    plumbing.check_batch(args.batch_size, world, args.grad_accum)
    if args.stage0_only:  # report.py: the stage both SFT runs of a seed share
        if real or ddp:
            raise SystemExit("--stage0_only: stage 0 exists for the built-in presets only, in one process")
        cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
        posebench.build(cfg)
        base, build, tokenizer = build_base(args, cfg)
        if args.preset == "tiny" and pose_input_on(args):
            res = stage0.pretrain_for_pose_input(base, args, cfg, device, lambda m: None)
        else:
            res = stage0.pretrain(base, build, tokenizer, cfg, args, device, lambda m: None)
        plumbing.atomic_write(os.path.join(args.out_dir, "stage0.json"), lambda fh: json.dump(res, fh, indent=1))
        for split in ("val", "test"):
            print(f"stage 0, pose encoder alone on {split}: MPJPE {res[f'stage0/{split}/pose_vit_mpjpe_mm']:.1f} mm, "
                  f"PA-MPJPE {res[f'stage0/{split}/pose_vit_pa_mpjpe_mm']:.1f} mm, median root error "
                  f"{res.get(f'stage0/{split}/pose_vit_root_error_deg', float('nan')):.1f} deg | mean training pose: "
                  f"{res[f'stage0/{split}/mean_pose_mpjpe_mm']:.1f} / "
                  f"{res[f'stage0/{split}/mean_pose_pa_mpjpe_mm']:.1f}")
        return
    prepare_out_dir(args.out_dir, args.resume, master)
    t_start = time.time()

    def barrier():
        if ddp:
            import torch.distributed as dist
            dist.barrier()

    log = plumbing.make_logger(args.out_dir, master, args.report_to, args)

    # ---- BOILERPLATE: data, stage 0 (once, on rank 0), the base model on every rank
    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    if master and not real:
        posebench.build(cfg)
    barrier()
    train = None if real else posebench.load_split("train", cfg)
    base_dir = os.path.join(args.out_dir, "base")
    built = base_flags(args)
    if os.path.exists(os.path.join(base_dir, "preset.json")) and not args.resume:
        check_base_flags(base_dir, built)
    if not os.path.exists(os.path.join(base_dir, "preset.json")):
        if master:
            if real:  # pretrained parts: no stage 0
                base, tokenizer = presets.build_llava_7b(args.llava_path, args.hmr2_ckpt, args.head_rank,
                                                         args.deterministic_head, pose_input=pose_input_on(args))
                presets.save_base(base, tokenizer, base_dir, args.preset)
            else:
                base, build, tokenizer = build_base(args, cfg)
                if args.preset == "tiny" and pose_input_on(args):  # the default run's stage 0, shared
                    stage0.pretrain_for_pose_input(base, args, cfg, device, log)
                else:
                    # trained once per key, then from the cache
                    stage0.pretrain(base, build, tokenizer, cfg, args, device, log)
                presets.save_base(base.cpu(), tokenizer, base_dir, args.preset)
            plumbing.atomic_write(os.path.join(base_dir, BASE_FLAGS), lambda fh: json.dump(built, fh, indent=1))
            del base
        barrier()
    if args.resume:
        step_dir = checkpoint.run_step(args.out_dir, "--out_dir", resume=True)
        policy, tokenizer, step_dir = presets.load_policy(args.out_dir, args.preset, trainable=True, step_dir=step_dir)
        state = checkpoint.load_train_state(step_dir)
    else:
        damaged = checkpoint.base_problems(base_dir)
        if damaged:
            raise SystemExit(f"{base_dir} is damaged: {'; '.join(damaged)}; delete it to build it again")
        base, tokenizer, _ = presets.load_base(base_dir, args.preset)
        torch.manual_seed(args.seed)  # the adapter's init must not depend on whether stage 0 ran in this process
        policy, state = presets.apply_lora(base, args.lora_rank, args.lora_alpha), None
    policy.to(device).train()
    inner = policy.get_base_model()
    if plumbing.use_gradient_checkpointing(args):
        presets.enable_gradient_checkpointing(inner)
    bodymodel = body.BodyModel(args.smpl_path or None).to(device)
    names, params = trainable_params(policy, state)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start = bad = 0
    if state is not None:
        start = restore_train_state(opt, state, args, rank, world)
        log({"resumed_from": step_dir}, start)
    if not real:
        tasks = data.PoseBenchTasks("train", cfg, tasks=data.mix_tasks(args.mix), mix=args.mix, seed=args.seed,
                                    length=data.FRESH_DRAWS if args.fresh_samples else None, reasoning=args.reasoning)
    n_img = inner.num_image_tokens
    if master:
        n_train = sum(p.numel() for p in params)
        print(f"SFT: preset {args.preset}, {n_train / 1e6:.2f}M trainable of "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M, {world} process(es), device {device}")

    # ---- ALGO: SFT steps
    from tqdm import tqdm
    t_loop = time.time()
    # The global batch of a step depends on the step alone (StepBatches): resuming replays it exactly.
    batches = plumbing.step_loader(tasks, args, start, rank, world, args.seed)
    for step in tqdm(range(start, args.steps), desc="SFT", disable=None if master else True,
                     initial=start, total=args.steps):
        micro = [data.collate(next(batches), tokenizer, n_img, max_length=args.max_length or None)
                 for _ in range(args.grad_accum)]
        # every loss is a sum over the step's micro-batches and ranks divided by their global counts: the
        # summed gradients are the one-batch gradient, whatever --grad_accum and the number of processes
        counts = torch.tensor([sum((b.labels[:, 1:] != -100).sum().item() for b in micro),
                               sum(b.pose_valid.sum().item() for b in micro)], dtype=torch.float64, device=device)
        n_tokens, n_poses = plumbing.all_reduce_sum(counts, ddp).clamp_min(1).tolist()
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, args.steps, args.lr, args.warmup_steps)
        opt.zero_grad(set_to_none=True)
        what, total, stats, stds = None, 0.0, {}, []  # a NaN/inf loss, gradient or weight skips the step
        for b in micro:
            b = b.to(device)
            logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos,
                                                    pose_values=b.pose_values)
            loss, part = sft_loss(logits, b.labels, dist, b, args, n_tokens, n_poses, bodymodel)
            if not plumbing.on_every_rank(bool(torch.isfinite(loss)), ddp, device):
                what = "loss"  # (count_bad_step)
                break
            loss.backward()
            total += loss.item()
            stats = {k: stats.get(k, 0.0) + v for k, v in part.items()}
            if not args.deterministic_head:
                stds.append(dist.stddev.detach())
            del logits, dist, loss
        if what is None:
            what, gnorm = plumbing.apply_gradients(opt, params, args.grad_clip, ddp, device)
        done = step + 1
        bad = checkpoint.count_bad_step(bad, what, done, args, log)
        if what is None and (done % args.log_every == 0 or done == args.steps):
            if not args.deterministic_head:
                stats["charts/pose_std_mean"] = torch.cat(stds).mean().item()
            log({**stats, "losses/total": total, "charts/grad_norm": gnorm.item(),
                 "charts/lr": opt.param_groups[0]["lr"],
                 "charts/steps_per_s": (done - start) / (time.time() - t_loop), **plumbing.gpu_peak(device)}, done)
        if done == args.steps and args.head_fit_steps and not real:
            if master:  # rank 0's model is the one saved
                fit_head(policy, tokenizer, tasks, args, device, lambda m: log(m, done), bodymodel)
            # every rank evaluates its shard of the test split below with the fitted head
            plumbing.broadcast_from_master(policy.get_base_model().pose_head.parameters(), ddp)
        stop = args.stop_after and done >= args.stop_after
        if done % args.save_every == 0 or done == args.steps or stop:
            save_checkpoint(args.out_dir, done, policy, opt, args, names, ddp, master)  # every rank takes part
        barrier()
        if stop:
            break

    # ---- BOILERPLATE: final evaluation on the test split (evaluate.py's code path; sharded over the ranks)
    if master and real:
        print(f"SFT done in {time.time() - t_start:.0f} s; no posebench evaluation for llava-1.5-7b "
              "(docs/REAL_RUNS.md: `python evaluate.py --preset llava-1.5-7b --ckpt DIR --eval_npz ... "
              "--posescript_dir ...`)")
    if not real and args.eval_samples > 0 and not (args.stop_after and args.stop_after < args.steps):
        test_tasks = data.PoseBenchTasks("test", cfg, seed=args.seed)
        res = evaluate_policy(policy, tokenizer, test_tasks, train, bodymodel, device, args.eval_samples,
                              n_generate=args.eval_generate,
                              abstract_reasoning=args.reasoning if data.trains_abstract(args.mix) else None)
        log({f"test/{k}": v for k, v in res.items()}, args.steps)
        if master:
            plumbing.atomic_write(os.path.join(args.out_dir, "test_metrics.json"),
                                  lambda fh: json.dump(res, fh, indent=1))
            pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            print(f"\nSFT done in {time.time() - t_start:.0f} s. Test split ({args.eval_samples} poses):")
            for task in ("image_to_pose", "text_to_pose"):
                print(f"  {task:14s} MPJPE {res[task + '/mpjpe_mm']:6.1f} mm  PA-MPJPE "
                      f"{res[task + '/pa_mpjpe_mm']:6.1f} mm   | mean training pose: MPJPE "
                      f"{res[task + '/mean_pose_mpjpe_mm']:6.1f}  PA-MPJPE {res[task + '/mean_pose_pa_mpjpe_mm']:6.1f}"
                      f"   | answer format valid {pct(res[task + '/format_valid'])}")
            print(f"  vqa            yes/no accuracy {pct(res['vqa/yes_no_accuracy'])}")
    log.close()  # the --report_to tracker
    if ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except realdata.DataFormatError as e:  # a dataset file that does not follow its schema: named, no traceback
        raise SystemExit(f"{os.path.basename(__file__)}: {e}") from None

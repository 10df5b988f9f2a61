"""Supervised fine-tuning of PoseLlava: the starting point of Pose-RFT (App. D, Table 4).

Stage 0 (built-in presets only; the paper starts from pretrained parts instead):
  a) the pose-aware ViT f_b (a convolutional stem, then 16 tokens) is pretrained on pose
     estimation: regress the 24 view-frame joints from the benchmark renders ("a Vision
     Transformer pretrained on pose estimation", App. A), and the view-frame 6D pose the head will
     output, through a readout of the MEAN token (`--stage0_readout mean`): the pose must fit one
     D-vector, as it must at `<POSE>`, so an attention layer that averages the tokens hands it to
     the language model whole;
  b) the CLIP tower f_a is pretrained contrastively on render/caption pairs (CLIP's objective,
     with a bag-of-words text encoder);
  c) the tiny preset's language model is pretrained on the training split's text (causal LM),
     standing in for a pretrained LLM, so that LoRA adapts a model that already speaks the language.
  Then both encoders are frozen, as in the paper (§4.1). Stage 0 depends on the benchmark, the
  preset's configuration, the stage-0 flags and the seed only; it runs once per such key and is
  cached (`stage0`, like the benchmark): the report's two SFT runs of a seed share it.
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
--llava_instruct_json + --coco_dir) instead of the built-in benchmark. Every asset and data file is
opened and checked before anything is built or written (`preflight_real`); one message names every
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
     and refitting it on cached `<POSE>` states of 12,000 training samples reads what the states
     carry (first measured on the earlier, blind miniature: docs/FINDINGS.md, finding 1).
  5. Stage 0's recipe (convolutional stem, mean-token readout of joints and 6D, 8 epochs at lr
     2e-3) is ours; with
     the earlier recipe (a plain ViT read through all its tokens, 3 epochs) the encoder alone was
     at 212.8 mm on val and SFT's `<POSE>` at 84 % of the mean pose's error (README, "Results").

Run:
    python train_sft.py                                   # tiny preset, CPU, a few minutes
    torchrun --nproc_per_node=8 train_sft.py --preset smol  # DDP: one code path, RANK switches it on
    python train_sft.py --resume                          # continue exactly from the last checkpoint
    python train_sft.py --mix 0.3 0.3 0.2 0.1 0.1         # + pose_to_text, pose_edit (pose as input; README)
    python train_sft.py --mix 0.4 0.4 0.2 0 0 0.4         # + abstract_to_pose (CoT-Pose; --reasoning false: no reasoning)
    torchrun --nproc_per_node=8 train_sft.py --preset llava-1.5-7b --llava_path ... --hmr2_ckpt ... \
        --posescript_dir ... --amass_dir ... --image_npz MPI-INF-3DHP=mpi_inf_3dhp_train.npz=/data/3dhp ...   # README
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import body
import checkpoint
import data
from checkpoint import prepare_out_dir, restore_train_state, save_checkpoint, trainable_params
import model as M
import posebench
import posevit
import realdata
from evaluate import evaluate_policy, setup_distributed
from metrics import gross_state_correct, mpjpe_mm, pa_mpjpe_mm, root_error_deg
from render import view_rotation


@dataclass
class Args:
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
    head_rank: int = field(default=4, metadata={"help": "rank R of the pose covariance's low-rank factor (0: diagonal)"})
    deterministic_head: bool = field(default=False, metadata={"help": "Table 3 baseline: mean-only head, L2 pose loss"})
    pose_nll_weight: float = field(default=1.0, metadata={"help": "weight of the Gaussian NLL (per pose dim) at <POSE>"})
    nll_trains_mean: bool = field(default=False, metadata={
        "help": "let the NLL's gradient reach the mean too; by default the NLL fits the covariance at the detached "
                "mean and the mean is regressed by the 6D L2 (a plain NLL scales each dimension's mean gradient by "
                "its inverse variance, so the head parks hard dimensions under a large variance)"})
    l2_6d_weight: float = field(default=1.0, metadata={"help": "weight of an L2 on the 6D mean (parameter regression)"})
    l2_joints_weight: float = field(default=0.0, metadata={"help": "weight of an L2 on joints from the mean (off by default)"})
    head_fit_steps: int = field(default=8000, metadata={
        "help": "after SFT on the built-in benchmark: fit the pose head alone for this many steps on cached <POSE> "
                "states (0: off; never on llava-1.5-7b)"})
    head_fit_samples: int = field(default=12000, metadata={"help": "training poses whose <POSE> states the head fit uses"})
    head_fit_batch: int = field(default=256, metadata={"help": "batch of the head fit"})
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
    # real runs (--preset llava-1.5-7b): assets and datasets by path (README, "Real runs on GPUs")
    llava_path: str = field(default="", metadata={"help": f"LLaVA-1.5-7B directory: {M.LLAVA_SOURCE}"})
    hmr2_ckpt: str = field(default="", metadata={"help": f"HMR2.0 checkpoint, f_b's weights: {posevit.HMR2_SOURCE}"})
    smpl_path: str = field(default="", metadata={
        "help": "licensed SMPL model file for the real targets' joints (https://smpl.is.tue.mpg.de; '' : procedural)"})
    posescript_dir: str = field(default="", metadata={"help": f"text-to-pose: {realdata.POSESCRIPT_SOURCE}, unzipped"})
    amass_dir: str = field(default="", metadata={"help": f"PoseScript's poses: {realdata.AMASS_SOURCE}"})
    image_npz: list[str] = field(default_factory=list, metadata={
        "help": f"image-to-pose sets as NAME=NPZ=IMAGE_DIR (H36M, MPI-INF-3DHP, COCO, MPII): {realdata.HMR2_DATA_SOURCE}"})
    bedlam_script_dir: str = field(default="", metadata={"help": f"image-text: the files of {realdata.BEDLAM_SCRIPT_SOURCE}"})
    bedlam_img_dir: str = field(default="", metadata={"help": "BEDLAM's images (holding training/ and validation/)"})
    llava_instruct_json: str = field(default="", metadata={"help": f"VQA: {realdata.LLAVA_INSTRUCT_SOURCE}"})
    coco_dir: str = field(default="", metadata={"help": "COCO train2017 image folder, for --llava_instruct_json"})
    real_mix: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.1, 0.2], metadata={
        "help": "real-data mixture: text-to-pose, image-to-pose, image-text, VQA (ours; the paper gives none)"})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto (on for llava-1.5-7b), yes or no"})

    def __post_init__(self):  # preset-dependent defaults, for the flags not given
        for k, v in PRESET_DEFAULTS.get(self.preset, PRESET_DEFAULTS["tiny"]).items():
            if getattr(self, k) is None:
                setattr(self, k, v)


SMALL = dict(steps=1200, batch_size=32, lr=1e-3, eval_samples=1000, max_length=0)
PRESET_DEFAULTS = {"tiny": SMALL, "smol": SMALL,
                   "llava-1.5-7b": dict(steps=10000, batch_size=80, lr=3e-4, eval_samples=0, max_length=2048)}  # Table 4


# flags every training script needs >= a minimum or > 0 (checkpoint.check_flags; a script adds its own)
AT_LEAST = dict(steps=1, batch_size=1, threads=1, log_every=1, save_every=1, max_bad_steps=1, seed=0, n_train=1,
                keep_checkpoints=0,
                n_val=1, n_test=1, warmup_steps=0, lora_rank=1, lora_alpha=1, eval_samples=0, eval_generate=0,
                stop_after=0, max_length=0, weight_decay=0.0)
POSITIVE = ("lr", "grad_clip")
SFT_AT_LEAST = dict(AT_LEAST, stage0_pose_epochs=0.0, stage0_clip_epochs=0.0, stage0_lm_steps=0, stage0_lm_batch=1,
                    stage0_batch=1, head_rank=0, head_fit_steps=0, head_fit_samples=2, head_fit_batch=1,
                    pose_nll_weight=0.0, l2_6d_weight=0.0, l2_joints_weight=0.0, stage0_rot6d_weight=0.0)


def check_args(args, script: str, at_least: dict, positive=POSITIVE) -> None:
    """Stop before any work or write, naming every flag that cannot run (checkpoint.check_flags) and the
    inputs read only later: --mix, --real_mix, --smpl_path."""
    checkpoint.check_flags(args, script, at_least, positive)
    w = np.asarray(args.mix, dtype=np.float64)
    if len(w) not in (len(data.TASKS), len(data.ALL_TASKS), len(data.MIX_TASKS)) or (w < 0).any() or w.sum() <= 0:
        raise SystemExit(f"{script}: --mix {' '.join(map(str, args.mix))}: expected {len(data.TASKS)} non-negative "
                         f"weights, not all zero ({', '.join(data.TASKS)}), or {len(data.ALL_TASKS)} with the "
                         f"pose-input tasks ({', '.join(data.POSE_INPUT_TASKS)}), or {len(data.MIX_TASKS)} with "
                         f"{data.ABSTRACT_TASK} too")
    if len(args.real_mix) != 4 or min(args.real_mix) < 0:
        raise SystemExit(f"{script}: --real_mix {' '.join(map(str, args.real_mix))}: expected 4 non-negative weights "
                         "(text-to-pose, image-to-pose, image-text, VQA)")
    if args.smpl_path and not os.path.isfile(args.smpl_path):
        raise SystemExit(f"{script}: --smpl_path {args.smpl_path}: not found; the licensed SMPL model file comes from "
                         "https://smpl.is.tue.mpg.de (SMPL for Python), or leave it out for the procedural body")


# ---- real runs: assets and data (--preset llava-1.5-7b) -------------------------------------

def check_real_assets(args, script: str) -> None:
    """Stop at once, before loading anything, naming every missing asset of a llava-1.5-7b run with
    the flag that takes it and where it comes from."""
    problems = []

    def need(flag, path, source, is_dir=False, inside=""):
        ok = path and (os.path.isdir(path) if is_dir else os.path.isfile(os.path.join(path, inside) if inside else path))
        if not ok:
            what = "not given" if not path else f"no {inside} in it" if inside else "not found"
            problems.append(f"--{flag} {path!r}: {what}; {source}")

    if script == "sft":
        need("llava_path", args.llava_path, M.LLAVA_SOURCE, inside="config.json")
        need("hmr2_ckpt", args.hmr2_ckpt, posevit.HMR2_SOURCE)
    pairs = [("posescript_dir", "amass_dir", realdata.POSESCRIPT_SOURCE, realdata.AMASS_SOURCE),
             ("bedlam_script_dir", "bedlam_img_dir", realdata.BEDLAM_SCRIPT_SOURCE, "https://bedlam.is.tue.mpg.de"),
             ("llava_instruct_json", "coco_dir", realdata.LLAVA_INSTRUCT_SOURCE, "https://cocodataset.org (train2017)")]
    for a, b, src_a, src_b in pairs:
        if getattr(args, a) or getattr(args, b):
            need(a, getattr(args, a), src_a, is_dir=a.endswith("_dir"))
            need(b, getattr(args, b), src_b, is_dir=True)
    for entry in args.image_npz:
        parts = entry.split("=")
        if len(parts) != 3:
            problems.append(f"--image_npz {entry!r}: expected NAME=NPZ=IMAGE_DIR, e.g. "
                            "MPI-INF-3DHP=mpi_inf_3dhp_train.npz=/data/3dhp")
            continue
        need("image_npz", parts[1], realdata.HMR2_DATA_SOURCE)
        need("image_npz", parts[2], f"the {parts[0]} images", is_dir=True)
    if not (args.posescript_dir or args.image_npz or args.bedlam_script_dir or args.llava_instruct_json):
        problems.append("no training data: give at least one of --posescript_dir (+ --amass_dir), --image_npz, "
                        "--bedlam_script_dir (+ --bedlam_img_dir), --llava_instruct_json (+ --coco_dir)")
    if args.smpl_path:
        need("smpl_path", args.smpl_path, "https://smpl.is.tue.mpg.de (SMPL for Python)")
    if script == "rft":
        if not args.smpl_path:
            problems.append("--smpl_path '': not given; the joint reward (Eq. 7) needs the licensed SMPL model, "
                            "https://smpl.is.tue.mpg.de (SMPL for Python)")
        need("sft_dir", args.sft_dir, "train it with `train_sft.py --preset llava-1.5-7b --llava_path ... --hmr2_ckpt "
             "...`", inside=os.path.join("base", "preset.json"))
        need("reward_retriever", args.reward_retriever, "train it with `python retrieval.py`", is_dir=True)
    if problems:
        raise SystemExit("--preset llava-1.5-7b: missing assets (nothing was loaded):\n  " + "\n  ".join(problems))


def real_image_size(args, script: str, problems: list) -> int | None:
    """The CLIP tower's input size the real samples are cropped to, from the config the model will load
    (SFT: --llava_path's; RFT: the SFT run's base), with LLaVA's tokenizer checked too (SFT); a problem
    appended for each file that does not load."""
    from transformers import AutoConfig, AutoTokenizer

    path = args.llava_path if script == "sft" else os.path.join(args.sft_dir, "base", "model")
    flag = "--llava_path" if script == "sft" else "--sft_dir"
    fix = f"download it again: {M.LLAVA_SOURCE}" if script == "sft" else "run train_sft.py again into another --out_dir"
    size = None
    try:  # RFT's base holds PoseLlava's config, which AutoConfig does not know: read by its own class
        size = int(AutoConfig.from_pretrained(path).vision_config.image_size if script == "sft" else
                   M.PoseLlavaConfig.from_pretrained(path).vision_config.image_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problems.append(f"{flag} {path}: its config.json does not load as a LLaVA config ({type(err).__name__}: "
                        f"{str(err)[:300]}); {fix}")
    if script == "sft":
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 -- whatever the tokenizer files lack, the same fix
            problems.append(f"{flag} {path}: its tokenizer does not load ({type(err).__name__}: {str(err)[:300]}); "
                            f"the directory must hold LLaVA's tokenizer files (tokenizer.json or tokenizer.model, "
                            f"tokenizer_config.json, special_tokens_map.json): {M.LLAVA_SOURCE}")
        else:
            if tok.convert_tokens_to_ids(data.IMAGE_TOKEN) in (None, tok.unk_token_id):
                problems.append(f"{flag} {path}: its tokenizer has no {data.IMAGE_TOKEN} token, so it is not LLaVA's; "
                                f"{M.LLAVA_SOURCE}")
        if not zipfile.is_zipfile(args.hmr2_ckpt):
            problems.append(f"--hmr2_ckpt {args.hmr2_ckpt}: not a readable checkpoint (not a zip archive: truncated "
                            f"or of another format); download it again: {posevit.HMR2_SOURCE}")
    return size


def preflight_real(args, script: str, seed: int) -> realdata.Mixture:
    """Everything a llava-1.5-7b run reads, checked before anything is built, loaded or written (every
    rank runs it): the files exist (check_real_assets); LLaVA's config and tokenizer, the HMR2.0 file
    (SFT) or the SFT base's config (RFT); the SMPL file loads; every dataset follows its schema (each
    loader reads its annotation files whole) and the files its records name are there (each dataset's
    `preflight`: every AMASS sequence's header, a sample of the images). Stops with every problem in one
    message, each naming the flag, the file, the record and the fix; else returns the training mixture:
    PoseScript (text-to-pose), HMR2.0-style npz sets (image-to-pose), BEDLAM-Script (image ->
    description), LLaVA-Instruct (VQA), weighted by --real_mix per kind and by size within a kind."""
    check_real_assets(args, script)
    problems = []
    image_size = real_image_size(args, script, problems)
    bodymodel = None
    try:  # the targets' joints (and, in RFT, the joint reward) come from this body
        bodymodel = body.BodyModel(args.smpl_path or None)
    except Exception as err:  # noqa: BLE001 -- any file that does not load as SMPL gets the same fix
        problems.append(f"--smpl_path {args.smpl_path}: not an SMPL model ({type(err).__name__}: {str(err)[:300]}); "
                        "pass the licensed SMPL model file (https://smpl.is.tue.mpg.de, 'SMPL for Python', or the "
                        "neutral model of SMPLify), or its copy by `python body.py convert`")
    size = image_size or 336  # a failed config is already a problem: the datasets are still checked
    kinds = {"text_to_pose": [], "image_to_pose": [], "image_text": [], "vqa": []}

    def add(kind, flag, make):
        try:
            ds = make()
        except (realdata.DataFormatError, FileNotFoundError, ValueError) as err:
            problems.append(f"{flag}: {err}")
            return
        problems.extend(f"{flag}: {p}" for p in ds.preflight())
        kinds[kind].append(ds)

    if args.posescript_dir:
        add("text_to_pose", "--posescript_dir / --amass_dir", lambda: realdata.PoseScript(
            args.posescript_dir, args.amass_dir, "train", bodymodel=bodymodel, seed=seed))
    for entry in args.image_npz:
        name, npz, img_dir = entry.split("=")
        add("image_to_pose", f"--image_npz {name}", lambda: realdata.HMR2ImageDataset(
            name, npz, img_dir, size, bodymodel, seed=seed))
    if args.bedlam_script_dir:
        add("image_text", "--bedlam_script_dir / --bedlam_img_dir", lambda: realdata.BEDLAMScript(
            args.bedlam_script_dir, args.bedlam_img_dir, "training", image_size=size, seed=seed))
    if args.llava_instruct_json:
        add("vqa", "--llava_instruct_json / --coco_dir", lambda: realdata.LLaVAInstruct(
            args.llava_instruct_json, args.coco_dir, size))
    if problems:
        raise SystemExit(f"--preset llava-1.5-7b: {len(problems)} problem(s) in the assets and data (nothing was "
                         "built or written):\n  - " + "\n  - ".join(problems))
    parts = [(d, w * len(d) / sum(len(x) for x in ds)) for w, ds in zip(args.real_mix, kinds.values()) for d in ds]
    return realdata.Mixture(parts, length=data.FRESH_DRAWS, seed=seed)  # every step draws afresh


def use_gradient_checkpointing(args) -> bool:
    return args.gradient_checkpointing == "yes" or (args.gradient_checkpointing == "auto"
                                                     and args.preset == "llava-1.5-7b")


# ---- distributed boilerplate (nanoGPT style: one code path) ---------------------------------

def all_reduce_sum(t: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def on_every_rank(ok: bool, ddp: bool, device) -> bool:
    """Whether ok holds on every rank (itself without DDP). A step is skipped by all ranks or by none:
    a rank that skipped alone would leave the others waiting in the gradient all-reduce."""
    if not ddp:
        return ok
    return all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=device), ddp).item() == 0


def apply_gradients(opt, params, grad_clip: float, ddp: bool, device, average: bool = False):
    """Sync (sync_gradients), clip and apply the gradients of one backward: returns (what was not finite,
    None if nothing, and the gradient norm). A NaN/inf gradient norm on any rank skips the step on every
    rank ("gradient": weights and optimizer state unchanged). "weight": the step left a NaN/inf weight,
    which cannot be undone; the caller stops the run (count_bad_step) before anything saves it."""
    sync_gradients(params, ddp, average)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not on_every_rank(bool(torch.isfinite(gnorm)), ddp, device):
        opt.zero_grad(set_to_none=True)
        return "gradient", gnorm
    opt.step()
    finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    return (None if on_every_rank(finite, ddp, device) else "weight"), gnorm


def count_bad_step(bad: int, what: str | None, done: int, args, log) -> int:
    """The count of consecutive skipped steps after step `done` (0 after a good one; `what` was not finite:
    loss, gradient, reward or weight), logged as skipped/nonfinite_{what}. Stops the run after
    --max_bad_steps of them, or at once for a weight, naming the last good checkpoint."""
    if what is None:
        return 0
    bad += 1
    log({f"skipped/nonfinite_{what}": bad}, done)
    if what == "weight" or bad >= args.max_bad_steps:
        why = ("its update left NaN/inf weights, which cannot be undone" if what == "weight" else
               f"{bad} consecutive steps with NaN/inf {what}s")
        raise SystemExit(f"aborting: {why} (step {done}); no checkpoint holds them, "
                         f"{checkpoint.last_good(args.out_dir)}. A diverging run: lower --lr (now {args.lr})")
    return bad


def broadcast_from_master(tensors, ddp: bool) -> None:
    """Copies rank 0's values of these tensors (e.g. a module's parameters) to every rank, in place."""
    if ddp:
        import torch.distributed as dist
        for t in tensors:
            dist.broadcast(t.data, src=0)


def sync_gradients(params, ddp: bool, average: bool = False):
    """Sum (or average) gradients over ranks. SFT sums: its losses are normalised by global counts,
    so the sum is the gradient of the global-batch loss, exactly as in one process. RFT averages:
    each rank's loss is a mean over its own whole groups."""
    if not ddp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, ddp)
    if average:
        import torch.distributed as dist
        flat /= dist.get_world_size()
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(g).clone()
        i += n


def make_logger(out_dir: str, master: bool):
    """log(metrics, step): one JSON object per call, printed and appended to out_dir/metrics.jsonl
    (rank 0 only)."""
    t_start = time.time()

    def log(d, step=None):
        if master:
            rec = {"step": step, "time_s": round(time.time() - t_start, 1), **d}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    return log


def gpu_peak(device: torch.device) -> dict:
    """The peak GPU memory this process has allocated so far, as a metric (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"charts/gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---- stage 0 --------------------------------------------------------------------------------

STAGE0_VERSION = 3  # bump when stage 0's recipe changes: part of its cache key


class Mean1(torch.nn.Module):
    def forward(self, x):  # (B, L, D) -> (B, D)
        return x.mean(1)


def stage0_pose_vit(model, train, evals: dict, args, device, log):
    """Pretrain f_b on pose estimation: PoseViT tokens, flattened (where a limb is matters) -> linear
    -> 24 x 3 view-frame joints, L1 loss, AdamW with a cosine schedule (`--stage0_pose_lr`).
    Returns the encoder's MPJPE / PA-MPJPE (mm) on each split of `evals` ({name: PoseBenchSplit}),
    beside always answering the mean training pose, and the per-step losses."""
    vit = model.model.pose_tower
    n_out = body.NUM_JOINTS * 3 + (M.POSE_DIM if args.stage0_rot6d_weight else 0)
    if args.stage0_readout == "flatten":
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(vit.dim * vit.grid[0] * vit.grid[1],
                                                                       n_out)).to(device)
    else:  # the mean token -> MLP: the pose must fit one D-vector, as it must at <POSE>
        head = torch.nn.Sequential(Mean1(), torch.nn.Linear(vit.dim, 4 * vit.dim), torch.nn.GELU(),
                                   torch.nn.Linear(4 * vit.dim, n_out)).to(device)
    rot6d = torch.as_tensor(data.view_pose6d(train), dtype=torch.float32).reshape(len(train), -1)  # (N, P)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_pose_lr, betas=(0.9, 0.95))
    steps = max(1, int(args.stage0_pose_epochs * len(train) / args.stage0_batch))
    g = torch.Generator().manual_seed(args.seed)
    target = torch.as_tensor(train.joints_view)
    encode = lambda images: head(model.model.pose_features(data.images_to_pixels(images, device)))  # noqa: E731
    losses = []
    from tqdm import tqdm
    for step in tqdm(range(steps), desc="stage 0a: pose ViT", disable=None):
        idx = torch.randint(len(train), (args.stage0_batch,), generator=g)
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, steps, args.stage0_pose_lr, min(50, steps // 10))
        out = encode(train.images[idx.numpy()])
        n_j = body.NUM_JOINTS * 3
        loss = F.l1_loss(out[:, :n_j], target[idx].reshape(len(idx), -1).to(device))
        if args.stage0_rot6d_weight:  # the view-frame 6D pose too: what the pose head will output
            loss = loss + args.stage0_rot6d_weight * F.l1_loss(out[:, n_j:], rot6d[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    res = {}
    with torch.no_grad():
        for name, split in evals.items():
            out = torch.cat([encode(split.images[i:i + 256]).cpu() for i in range(0, len(split), 256)])
            pred = out[:, :body.NUM_JOINTS * 3].reshape(-1, body.NUM_JOINTS, 3)
            if args.stage0_rot6d_weight:  # the readout's root orientation, as evaluate.py measures <POSE>'s
                gt_root = torch.as_tensor(data.view_pose6d(split))[:, 0].float()
                res[f"stage0/{name}/pose_vit_root_error_deg"] = root_error_deg(
                    body.rot6d_to_matrix(out[:, body.NUM_JOINTS * 3:body.NUM_JOINTS * 3 + 6]),
                    body.rot6d_to_matrix(gt_root)).median().item()
            gt = torch.as_tensor(split.joints_view)
            mean_pose = target.mean(0, keepdim=True).expand_as(gt)
            cam = torch.as_tensor(split.camera)
            world = pred.double() @ view_rotation(cam[:, 0], cam[:, 1]).double()  # the camera undone (row vectors)
            res.update({f"stage0/{name}/pose_vit_mpjpe_mm": mpjpe_mm(pred, gt).mean().item(),
                        f"stage0/{name}/pose_vit_gross_state_correct": gross_state_correct(world, split.joints),
                        f"stage0/{name}/pose_vit_pa_mpjpe_mm": pa_mpjpe_mm(pred, gt).mean().item(),
                        f"stage0/{name}/mean_pose_mpjpe_mm": mpjpe_mm(mean_pose, gt).mean().item(),
                        f"stage0/{name}/mean_pose_pa_mpjpe_mm": pa_mpjpe_mm(mean_pose, gt).mean().item()})
    log(res)
    return res, losses


def stage0_clip(model, train, tokenizer, args, device, log):
    """Pretrain f_a with CLIP's symmetric contrastive loss on render/caption pairs; the text
    side is a bag of word embeddings (thrown away afterwards)."""
    clip = model.model.vision_tower
    D = clip.config.hidden_size
    words = torch.nn.Embedding(len(tokenizer), D).to(device)
    img_proj = torch.nn.Linear(D, D).to(device)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = list(clip.parameters()) + list(words.parameters()) + list(img_proj.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, betas=(0.9, 0.95))
    steps = int(args.stage0_clip_epochs * len(train) / args.stage0_batch)
    g = torch.Generator().manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm
    for step in tqdm(range(steps), desc="stage 0b: CLIP tower", disable=None):
        idx = torch.randint(len(train), (args.stage0_batch,), generator=g).numpy()
        texts = [train.captions[i][rng.integers(len(train.captions[i]))] for i in idx]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        t = F.normalize((words(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)  # mean of words
        v = F.normalize(img_proj(clip(data.images_to_pixels(train.images[idx], device)).pooler_output), dim=-1)
        logits = scale.exp().clamp(max=100) * v @ t.T  # (B, B)
        labels = torch.arange(len(idx), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if steps:  # (0 epochs: the tower stays as initialised)
        log({"stage0/clip_loss": loss.item(), "stage0/clip_batch_top1": (logits.argmax(1) == labels).float().mean().item()})


def pose_input_on(args) -> bool:
    """The pose-input tasks are in the mixture (--mix with 5 weights): the tiny preset then speaks the
    extended vocabulary, and every preset's model has the pose encoder."""
    return len(args.mix) >= len(data.ALL_TASKS)


def abstract_on(args) -> bool:
    """--mix with 6 weights: abstract_to_pose is in the mixture (the tiny preset's vocabulary extended further)."""
    return len(args.mix) == len(data.MIX_TASKS)


def run_tasks(args) -> tuple:
    """The posebench tasks --mix weighs."""
    return data.MIX_TASKS if abstract_on(args) else data.ALL_TASKS if pose_input_on(args) else data.TASKS


def stage0_lm_texts(cfg: posebench.BenchConfig) -> list:
    """The LM pretraining texts: the training split's prompts and answers without image placeholders."""
    return [t for t in data.benchmark_texts(cfg, splits=("train",)) if data.IMAGE_TOKEN not in t]


def stage0_lm(model, tokenizer, cfg, args, device, log):
    """Pretrain the tiny LM (and LM head) on the benchmark's training texts: prompts and answers in
    the chat format, image placeholders dropped (no val or test caption). Stands in for a pretrained
    LLM."""
    texts = stage0_lm_texts(cfg)
    lm = model.model.language_model
    params = list(lm.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm
    for step in tqdm(range(args.stage0_lm_steps), desc="stage 0c: LM", disable=None):
        batch = [texts[i] for i in rng.integers(len(texts), size=args.stage0_lm_batch)]
        enc = tokenizer([tokenizer.bos_token + " " + t + " " + tokenizer.eos_token for t in batch],
                        padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model.lm_head(lm(input_ids=ids, attention_mask=mask).last_hidden_state)
        labels = ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, args.stage0_lm_steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if args.stage0_lm_steps:
        log({"stage0/lm_loss": loss.item()})


def stage0_parts(model, preset: str) -> dict:
    """The modules stage 0 trains: both encoders, and the tiny preset's LM and LM head."""
    parts = {"pose_tower": model.model.pose_tower, "vision_tower": model.model.vision_tower}
    if preset == "tiny":
        parts.update(language_model=model.model.language_model, lm_head=model.lm_head)
    return parts


def stage0_key(args, cfg: posebench.BenchConfig, model) -> tuple:
    """(key, what): stage 0's cache key, a hash of everything its result depends on: the benchmark,
    the preset and its parts' configurations, the stage-0 flags, the seed and STAGE0_VERSION."""
    import hashlib

    c = model.config
    what = {"version": STAGE0_VERSION, "preset": args.preset, "bench": posebench.config_key(cfg), "seed": args.seed,
            "pose_vision_config": c.pose_vision_config, "vision_config": c.vision_config.to_dict(),
            "text_config": c.text_config.to_dict() if args.preset == "tiny" else c.text_config._name_or_path,
            **{k: getattr(args, k) for k in sorted(vars(args)) if k.startswith("stage0_") and k != "stage0_only"}}
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], json.loads(blob)


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
        tokenizer = data.tiny_tokenizer(cfg, pose_input=pose_input, abstract=abstract_on(args))
        return (M.build_tiny(tokenizer, rank=args.head_rank, deterministic=args.deterministic_head),
                lambda: M.build_tiny(tokenizer, rank=args.head_rank), tokenizer)
    base, tokenizer = M.build_smol(rank=args.head_rank, deterministic=args.deterministic_head, pose_input=pose_input)
    return base, lambda: M.build_smol(rank=args.head_rank, pose_input=pose_input)[0], tokenizer


def stage0(base, build, tokenizer, cfg, args, device, log) -> dict:
    """Stage 0, run once per cache key (`stage0_key`) and cached in <cache_dir>/stage0/<key>/, as the
    benchmark is: both SFT runs of a seed share one pretrained encoder, and a rerun finds it.

    On a miss, the parts are trained on a model made by `build()` under `torch.manual_seed(seed)`
    (so the result depends on the key alone, not on the run's pose head) and saved atomically; then
    they are loaded into `base`. Returns the encoder's metrics (`stage0_pose_vit`)."""
    from safetensors.torch import load_file, save_file

    key, what = stage0_key(args, cfg, base)
    folder = os.path.join(body.cache_dir(), "stage0", key)
    weights, meta = os.path.join(folder, "stage0.safetensors"), os.path.join(folder, "stage0.json")
    if not (os.path.exists(weights) and os.path.exists(meta)):
        t0 = time.time()
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = build().to(device).train()
        evals = {s: posebench.load_split(s, cfg) for s in ("val", "test")}
        train = posebench.load_split("train", cfg)
        seconds = {"setup": time.time() - t0}  # the model and the splits
        t = time.time()
        res, _ = stage0_pose_vit(model, train, evals, args, device, log)
        seconds["pose_vit"], t = time.time() - t, time.time()
        stage0_clip(model, train, tokenizer, args, device, log)
        seconds["clip"], t = time.time() - t, time.time()
        if args.preset == "tiny":
            stage0_lm(model, tokenizer, cfg, args, device, log)
            seconds["lm"] = time.time() - t
        sd = {f"{name}.{k}": v.detach().cpu().contiguous()
              for name, m in stage0_parts(model, args.preset).items() for k, v in m.state_dict().items()}
        tmp = f"{folder}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(sd, os.path.join(tmp, "stage0.safetensors"))
        with open(os.path.join(tmp, "stage0.json"), "w") as fh:
            json.dump({"key": what, "metrics": res, "seconds": round(time.time() - t0, 1),
                       "seconds_by_part": {k: round(v, 1) for k, v in seconds.items()}}, fh, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        del model
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        print(f"stage 0: trained in {time.time() - t0:.0f} s ({parts}), cached in {folder}")
    else:
        print(f"stage 0: found in the cache ({folder})")
    try:
        sd = load_file(weights)
        with open(meta) as fh:
            res = json.load(fh)["metrics"]
    except Exception as e:
        raise SystemExit(f"stage 0's cache {folder} is unreadable ({type(e).__name__}: {e}); delete that folder and "
                         "rerun to retrain stage 0") from e
    for name, m in stage0_parts(base, args.preset).items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
    log(res)
    return res


def stage0_pose_input(base, args, cfg, device, log) -> dict:
    """Stage 0 of a tiny-preset run with the pose-input tasks: the default run's own (built, keyed and
    cached from the default vocabulary's model, so the two runs share one cache entry and the
    pose-input tasks add no stage-0 training), copied into `base`; the language model's input and
    output embeddings are copied into the first rows of the extended vocabulary (data.extend_tokenizer
    keeps every default id), whose new rows (the input-pose placeholder, the instructions' words) keep
    their initialisation. Returns the encoder's metrics, as `stage0`."""
    tok0 = data.tiny_tokenizer(cfg)
    default = M.build_tiny(tok0, rank=args.head_rank, deterministic=args.deterministic_head)
    res = stage0(default, lambda: M.build_tiny(tok0, rank=args.head_rank), tok0, cfg, args, device, log)
    src, dst = stage0_parts(default, args.preset), stage0_parts(base, args.preset)
    with torch.no_grad():
        for name, module in src.items():
            target = dict(dst[name].named_parameters())
            for k, v in module.named_parameters():
                t = target[k]
                if t.shape != v.shape and (t.shape[1:] != v.shape[1:] or t.shape[0] < v.shape[0]):
                    raise RuntimeError(f"stage 0 of the default vocabulary does not fit {name}.{k}: {tuple(v.shape)} "
                                       f"into {tuple(t.shape)}")
                t[:len(v)] = v
    return res


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
        joints = bodymodel.forward_rot6d(pose_dist.mean[valid]).joints
        joints = joints - joints[:, :1]
        l2_joints = ((joints - batch.joints[valid]) ** 2).sum(-1).mean(-1).sum() / n_poses
    loss = ce + pose + l2_6d + args.l2_joints_weight * l2_joints
    stats = {"losses/ce": ce, "losses/pose": pose, "losses/l2_6d": l2_6d, "losses/l2_joints": l2_joints}
    return loss, {k: float(v.detach()) for k, v in stats.items()}


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
        pose_dist = M.detach_mean(pose_dist)
    nll = (-pose_dist.log_prob(target) / target.shape[-1])[valid].sum() / n_poses
    return args.pose_nll_weight * nll, args.l2_6d_weight * l2_6d


@torch.no_grad()
def pose_states(policy, tokenizer, samples, device, batch_size: int = 128):
    """The teacher-forced `<POSE>` states of pose samples and their 6D targets: (N, D) float32 and
    (N, P), on `device` (for fit_head, and for probe.py)."""
    n_img = policy.get_base_model().num_image_tokens
    states, targets = [], []
    for i in range(0, len(samples), batch_size):
        b = data.collate(samples[i:i + batch_size], tokenizer, n_img).to(device)
        _, _, h = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos,
                                        pose_values=b.pose_values)
        states.append(h.float())
        targets.append(b.pose6d.reshape(len(h), -1))
    return torch.cat(states), torch.cat(targets)


def fit_head(policy, tokenizer, tasks: data.PoseBenchTasks, args, device, log):
    """Fit the pose head alone on cached `<POSE>` states of training poses, with the SFT pose loss.

    Stage 1 sees each training pose about once on the tiny preset (the LM forward is the cost);
    the head is cheap, and refitting it for many epochs on the final states is what lets it read
    the view orientation that the states do carry (measured: a linear probe of the states beat the
    stage-1 head by 70 mm MPJPE on val).
    """
    fit = [t for t in data.POSE_ANSWER_TASKS if t in data.POSE_TASKS or t in tasks.tasks]  # + pose_edit, if trained
    per_task = args.head_fit_samples // len(fit)
    samples = [s for t in fit for s in tasks.eval_samples(t)[:per_task]]
    policy.eval()
    states, targets = pose_states(policy, tokenizer, samples, device)
    policy.train()
    head = policy.get_base_model().pose_head
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 2)
    valid = torch.ones(args.head_fit_batch, dtype=torch.bool, device=device)
    for step in range(args.head_fit_steps):
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, args.head_fit_steps, args.lr, 0)
        idx = torch.randint(len(states), (args.head_fit_batch,), generator=g).to(device)
        nll, l2_6d = pose_loss(head.distribution(states[idx]), targets[idx], valid, args, args.head_fit_batch)
        opt.zero_grad(set_to_none=True)
        (nll + l2_6d).backward()
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == args.head_fit_steps:
            log({"head_fit/pose": nll.item(), "head_fit/l2_6d": l2_6d.item(), "head_fit/step": step + 1})


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.preset not in M.PRESETS:
        raise SystemExit(f"--preset {args.preset}: train_sft.py knows {', '.join(M.PRESETS)}")
    check_args(args, "train_sft.py", SFT_AT_LEAST, POSITIVE + ("stage0_lr", "stage0_pose_lr"))
    real = args.preset == "llava-1.5-7b"
    if real and pose_input_on(args):
        raise SystemExit("train_sft.py: --mix with 5 weights: the pose-input tasks are posebench's; the real-data "
                         "mixture (--real_mix) has none yet")
    tasks = preflight_real(args, "sft", args.seed) if real else None  # every real input checked: before any write
    if args.stage0_readout not in ("mean", "flatten"):
        raise SystemExit(f"--stage0_readout {args.stage0_readout}: expected mean or flatten")
    if not (args.deterministic_head or args.nll_trains_mean or args.l2_6d_weight > 0):
        raise SystemExit("--l2_6d_weight 0 leaves the pose head's mean untrained (the NLL fits only the covariance); "
                         "pass --nll_trains_mean true to train the mean by the NLL instead")
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if args.batch_size % world:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")
    if args.stage0_only:  # report.py: the stage both SFT runs of a seed share
        if real or ddp:
            raise SystemExit("--stage0_only: stage 0 exists for the built-in presets only, in one process")
        cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
        posebench.build(cfg)
        base, build, tokenizer = build_base(args, cfg)
        if args.preset == "tiny" and pose_input_on(args):
            res = stage0_pose_input(base, args, cfg, device, lambda m: None)
        else:
            res = stage0(base, build, tokenizer, cfg, args, device, lambda m: None)
        body.atomic_write(os.path.join(args.out_dir, "stage0.json"), lambda fh: json.dump(res, fh, indent=1))
        for split in ("val", "test"):
            print(f"stage 0, pose encoder alone on {split}: MPJPE {res[f'stage0/{split}/pose_vit_mpjpe_mm']:.1f} mm, "
                  f"PA-MPJPE {res[f'stage0/{split}/pose_vit_pa_mpjpe_mm']:.1f} mm, median root error "
                  f"{res.get(f'stage0/{split}/pose_vit_root_error_deg', float('nan')):.1f} deg | mean training pose: "
                  f"{res[f'stage0/{split}/mean_pose_mpjpe_mm']:.1f} / {res[f'stage0/{split}/mean_pose_pa_mpjpe_mm']:.1f}")
        return
    prepare_out_dir(args.out_dir, args.resume, master)
    t_start = time.time()

    def barrier():
        if ddp:
            import torch.distributed as dist
            dist.barrier()

    log = make_logger(args.out_dir, master)

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
                base, tokenizer = M.build_llava_7b(args.llava_path, args.hmr2_ckpt, args.head_rank, args.deterministic_head)
                M.save_base(base, tokenizer, base_dir, args.preset)
            else:
                base, build, tokenizer = build_base(args, cfg)
                if args.preset == "tiny" and pose_input_on(args):  # the default run's stage 0, shared
                    stage0_pose_input(base, args, cfg, device, log)
                else:
                    stage0(base, build, tokenizer, cfg, args, device, log)  # trained once per key, then from the cache
                M.save_base(base.cpu(), tokenizer, base_dir, args.preset)
            body.atomic_write(os.path.join(base_dir, BASE_FLAGS), lambda fh: json.dump(built, fh, indent=1))
            del base
        barrier()
    if args.resume:
        step_dir = checkpoint.run_step(args.out_dir, "--out_dir", resume=True)
        policy, tokenizer, step_dir = M.load_policy(args.out_dir, args.preset, trainable=True, step_dir=step_dir)
        state = checkpoint.load_train_state(step_dir)
    else:
        damaged = checkpoint.base_problems(base_dir)
        if damaged:
            raise SystemExit(f"{base_dir} is damaged: {'; '.join(damaged)}; delete it to build it again")
        base, tokenizer, _ = M.load_base(base_dir, args.preset)
        torch.manual_seed(args.seed)  # the adapter's init must not depend on whether stage 0 ran in this process
        policy, state = M.apply_lora(base, args.lora_rank, args.lora_alpha), None
    policy.to(device).train()
    inner = policy.get_base_model()
    if use_gradient_checkpointing(args):
        M.enable_gradient_checkpointing(inner)
    bodymodel = body.BodyModel(args.smpl_path or None).to(device)
    names, params = trainable_params(policy, state)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start = bad = 0
    if state is not None:
        start = restore_train_state(opt, state, args, rank, world)
        log({"resumed_from": step_dir}, start)
    if not real:
        tasks = data.PoseBenchTasks("train", cfg, tasks=run_tasks(args), mix=args.mix, seed=args.seed,
                                    length=data.FRESH_DRAWS if args.fresh_samples else None, reasoning=args.reasoning)
    n_img = inner.num_image_tokens
    if master:
        n_train = sum(p.numel() for p in params)
        print(f"SFT: preset {args.preset}, {n_train / 1e6:.2f}M trainable of "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M, {world} process(es), device {device}")

    # ---- ALGO: SFT steps
    from tqdm import tqdm
    t_loop = time.time()
    for step in tqdm(range(start, args.steps), desc="SFT", disable=None if master else True,
                     initial=start, total=args.steps):
        # The global batch of this step depends on the step alone: resuming replays it exactly.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(tasks), (args.batch_size,), generator=g)[rank::world].tolist()
        b = data.collate([tasks[i] for i in idx], tokenizer, n_img, max_length=args.max_length or None).to(device)
        counts = torch.tensor([(b.labels[:, 1:] != -100).sum().item(), b.pose_valid.sum().item()],
                              dtype=torch.float64, device=device)
        n_tokens, n_poses = all_reduce_sum(counts, ddp).clamp_min(1).tolist()
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup_steps)
        logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos,
                                                pose_values=b.pose_values)
        loss, stats = sft_loss(logits, b.labels, dist, b, args, n_tokens, n_poses, bodymodel)
        what = "loss"  # a NaN/inf loss, gradient or weight skips the step (count_bad_step)
        if on_every_rank(bool(torch.isfinite(loss)), ddp, device):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            what, gnorm = apply_gradients(opt, params, args.grad_clip, ddp, device)
        done = step + 1
        bad = count_bad_step(bad, what, done, args, log)
        if what is None and (done % args.log_every == 0 or done == args.steps):
            if not args.deterministic_head:
                stats["charts/pose_std_mean"] = dist.stddev.mean().item()
            log({**stats, "losses/total": loss.item(), "charts/grad_norm": gnorm.item(),
                 "charts/lr": opt.param_groups[0]["lr"],
                 "charts/steps_per_s": (done - start) / (time.time() - t_loop), **gpu_peak(device)}, done)
        if done == args.steps and args.head_fit_steps and not real:
            if master:  # rank 0's model is the one saved
                fit_head(policy, tokenizer, tasks, args, device, lambda m: log(m, done))
            # every rank evaluates its shard of the test split below with the fitted head
            broadcast_from_master(policy.get_base_model().pose_head.parameters(), ddp)
        stop = args.stop_after and done >= args.stop_after
        if done % args.save_every == 0 or done == args.steps or stop:
            save_checkpoint(args.out_dir, done, policy, opt, args, names, ddp, master)  # every rank takes part
        barrier()
        if stop:
            break

    # ---- BOILERPLATE: final evaluation on the test split (evaluate.py's code path; sharded over the ranks)
    if master and real:
        print(f"SFT done in {time.time() - t_start:.0f} s; no posebench evaluation for llava-1.5-7b (README: "
              "`python evaluate.py --preset llava-1.5-7b --ckpt DIR --eval_npz ... --posescript_dir ...`)")
    if not real and args.eval_samples > 0 and not (args.stop_after and args.stop_after < args.steps):
        test_tasks = data.PoseBenchTasks("test", cfg, seed=args.seed)
        res = evaluate_policy(policy, tokenizer, test_tasks, train, bodymodel, device, args.eval_samples,
                              n_generate=args.eval_generate,
                              abstract_reasoning=args.reasoning if abstract_on(args) and args.mix[-1] > 0 else None)
        log({f"test/{k}": v for k, v in res.items()}, args.steps)
        if master:
            body.atomic_write(os.path.join(args.out_dir, "test_metrics.json"), lambda fh: json.dump(res, fh, indent=1))
            pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            print(f"\nSFT done in {time.time() - t_start:.0f} s. Test split ({args.eval_samples} poses):")
            for task in ("image_to_pose", "text_to_pose"):
                print(f"  {task:14s} MPJPE {res[task + '/mpjpe_mm']:6.1f} mm  PA-MPJPE {res[task + '/pa_mpjpe_mm']:6.1f} mm"
                      f"   | mean training pose: MPJPE {res[task + '/mean_pose_mpjpe_mm']:6.1f}  PA-MPJPE "
                      f"{res[task + '/mean_pose_pa_mpjpe_mm']:6.1f}   | answer format valid {pct(res[task + '/format_valid'])}")
            print(f"  vqa            yes/no accuracy {pct(res['vqa/yes_no_accuracy'])}")
    if ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except realdata.DataFormatError as e:  # a dataset file that does not follow its schema: named, no traceback
        raise SystemExit(f"{os.path.basename(__file__)}: {e}") from None

"""Everything a real run reads, checked before anything is built, loaded or written (--preset llava-1.5-7b)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field

import body
import data
import posevit
import presets
from model import PoseLlavaConfig
from realdata.common import (AMASS_SOURCE, BEDLAM_SCRIPT_SOURCE, DataFormatError, HMR2_DATA_SOURCE,
                             LLAVA_INSTRUCT_SOURCE, POSESCRIPT_SOURCE)
from realdata.images import BEDLAMScript, HMR2ImageDataset
from realdata.instruct import LLaVAInstruct, Mixture
from realdata.posefix import POSEFIX_SOURCE, PoseFix
from realdata.posescript import PoseScript


@dataclass
class RealDataFlags:
    """The real-data flags both training scripts take (--preset llava-1.5-7b; docs/REAL_RUNS.md): each dataset
    by path, their mixture, and gradient checkpointing (on for llava-1.5-7b by default)."""
    posescript_dir: str = field(default="", metadata={"help": f"text-to-pose: {POSESCRIPT_SOURCE}, unzipped"})
    amass_dir: str = field(default="", metadata={"help": f"PoseScript's poses: {AMASS_SOURCE}"})
    image_npz: list[str] = field(default_factory=list, metadata={
        "help": f"image-to-pose sets as NAME=NPZ=IMAGE_DIR (H36M, MPI-INF-3DHP, COCO, MPII): "
                f"{HMR2_DATA_SOURCE}"})
    bedlam_script_dir: str = field(default="", metadata={
        "help": f"image-text: the files of {BEDLAM_SCRIPT_SOURCE}"})
    bedlam_img_dir: str = field(default="", metadata={"help": "BEDLAM's images (holding training/ and validation/)"})
    llava_instruct_json: str = field(default="", metadata={"help": f"VQA: {LLAVA_INSTRUCT_SOURCE}"})
    coco_dir: str = field(default="", metadata={"help": "COCO train2017 image folder, for --llava_instruct_json"})
    posefix_dir: str = field(default="", metadata={
        "help": f"pose editing (--real_mix with 6 weights): {POSEFIX_SOURCE}, unzipped; its poses come from "
                "--amass_dir, its pose ids from --posescript_dir's ids file when the release lacks one"})
    real_mix: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.1, 0.2], metadata={
        "help": "real-data mixture: text-to-pose, image-to-pose, image-text, VQA (ours; the paper gives none); "
                "6 weights add pose-to-text (PoseScript's captions, --posescript_dir) and pose editing "
                "(--posefix_dir): the model then takes a pose as input"})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto (on for llava-1.5-7b), yes or no"})


def real_pose_input(args) -> bool:
    """--real_mix with 6 weights: the real mixture holds the pose-input tasks (the model takes a pose as input)."""
    return len(args.real_mix) == 6


def check_real_assets(args, script: str) -> None:
    """Stop at once, before loading anything, naming every missing asset of a llava-1.5-7b run with
    the flag that takes it and where it comes from."""
    problems = []

    def need(flag, path, source, is_dir=False, inside=""):
        where = os.path.join(path, inside) if inside else path
        ok = path and (os.path.isdir(path) if is_dir else os.path.isfile(where))
        if not ok:
            what = "not given" if not path else f"no {inside} in it" if inside else "not found"
            problems.append(f"--{flag} {path!r}: {what}; {source}")

    if script == "sft":
        need("llava_path", args.llava_path, presets.LLAVA_SOURCE, inside="config.json")
        need("hmr2_ckpt", args.hmr2_ckpt, posevit.HMR2_SOURCE)
    pose_input = real_pose_input(args)
    if args.posefix_dir and not pose_input:
        problems.append(f"--posefix_dir {args.posefix_dir!r}: pose editing needs --real_mix with 6 weights (the "
                        "last: pose editing), e.g. --real_mix 0.3 0.3 0.1 0.1 0.1 0.1")
    if pose_input and args.real_mix[4] > 0 and not args.posescript_dir:
        problems.append("--real_mix: a pose-to-text weight needs --posescript_dir (+ --amass_dir); "
                        f"{POSESCRIPT_SOURCE}")
    if pose_input and args.real_mix[5] > 0:
        need("posefix_dir", args.posefix_dir, POSEFIX_SOURCE, is_dir=True)
        need("amass_dir", args.amass_dir, AMASS_SOURCE, is_dir=True)
    pairs = [("posescript_dir", "amass_dir", POSESCRIPT_SOURCE, AMASS_SOURCE),
             ("bedlam_script_dir", "bedlam_img_dir", BEDLAM_SCRIPT_SOURCE, "https://bedlam.is.tue.mpg.de"),
             ("llava_instruct_json", "coco_dir", LLAVA_INSTRUCT_SOURCE, "https://cocodataset.org (train2017)")]
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
        need("image_npz", parts[1], HMR2_DATA_SOURCE)
        need("image_npz", parts[2], f"the {parts[0]} images", is_dir=True)
    if not (args.posescript_dir or args.image_npz or args.bedlam_script_dir or args.llava_instruct_json
            or args.posefix_dir):
        problems.append("no training data: give at least one of --posescript_dir (+ --amass_dir), --image_npz, "
                        "--bedlam_script_dir (+ --bedlam_img_dir), --llava_instruct_json (+ --coco_dir), "
                        "--posefix_dir (+ --amass_dir)")
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
    fix = (f"download it again: {presets.LLAVA_SOURCE}" if script == "sft" else
           "run train_sft.py again into another --out_dir")
    size = None
    try:  # RFT's base holds PoseLlava's config, which AutoConfig does not know: read by its own class
        size = int(AutoConfig.from_pretrained(path).vision_config.image_size if script == "sft" else
                   PoseLlavaConfig.from_pretrained(path).vision_config.image_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problems.append(f"{flag} {path}: its config.json does not load as a LLaVA config ({type(err).__name__}: "
                        f"{str(err)[:300]}); {fix}")
    if script == "sft":
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 -- whatever the tokenizer files lack, the same fix
            problems.append(f"{flag} {path}: its tokenizer does not load ({type(err).__name__}: {str(err)[:300]}); "
                            f"the directory must hold LLaVA's tokenizer files (tokenizer.json or tokenizer.model, "
                            f"tokenizer_config.json, special_tokens_map.json): {presets.LLAVA_SOURCE}")
        else:
            if tok.convert_tokens_to_ids(data.IMAGE_TOKEN) in (None, tok.unk_token_id):
                problems.append(f"{flag} {path}: its tokenizer has no {data.IMAGE_TOKEN} token, so it is not LLaVA's; "
                                f"{presets.LLAVA_SOURCE}")
        if not zipfile.is_zipfile(args.hmr2_ckpt):
            problems.append(f"--hmr2_ckpt {args.hmr2_ckpt}: not a readable checkpoint (not a zip archive: truncated "
                            f"or of another format); download it again: {posevit.HMR2_SOURCE}")
    return size


def preflight_real(args, script: str, seed: int) -> Mixture:
    """Everything a llava-1.5-7b run reads, checked before anything is built, loaded or written (every
    rank runs it): the files exist (check_real_assets); LLaVA's config and tokenizer, the HMR2.0 file
    (SFT) or the SFT base's config (RFT); the SMPL file loads; every dataset follows its schema (each
    loader reads its annotation files whole) and the files its records name are there (each dataset's
    `preflight`: every AMASS sequence's header, a sample of the images). Stops with every problem in one
    message, each naming the flag, the file, the record and the fix; else returns the training mixture:
    PoseScript (text-to-pose), HMR2.0-style npz sets (image-to-pose), BEDLAM-Script (image ->
    description), LLaVA-Instruct (VQA), and with 6 weights PoseScript (pose-to-text) and PoseFix (pose
    editing), weighted by --real_mix per kind and by size within a kind."""
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
    kinds.update({"pose_to_text": [], "pose_edit": []} if real_pose_input(args) else {})

    def add(kind, flag, make):
        try:
            ds = make()
        except (DataFormatError, FileNotFoundError, ValueError) as err:
            problems.append(f"{flag}: {err}")
            return
        problems.extend(f"{flag}: {p}" for p in ds.preflight())
        kinds[kind].append(ds)

    if args.posescript_dir:
        add("text_to_pose", "--posescript_dir / --amass_dir", lambda: PoseScript(
            args.posescript_dir, args.amass_dir, "train", bodymodel=bodymodel, seed=seed))
    if "pose_to_text" in kinds and args.real_mix[4] > 0:
        add("pose_to_text", "--posescript_dir / --amass_dir (pose-to-text)", lambda: PoseScript(
            args.posescript_dir, args.amass_dir, "train", seed=seed, task="pose_to_text"))
    if "pose_edit" in kinds and args.real_mix[5] > 0:
        ids_file = os.path.join(args.posefix_dir, PoseFix.IDS_FILE)
        if not os.path.isfile(ids_file) and args.posescript_dir:  # the PoseScript release's copy
            ids_file = os.path.join(args.posescript_dir, PoseFix.IDS_FILE)
        add("pose_edit", "--posefix_dir / --amass_dir", lambda: PoseFix(
            args.posefix_dir, args.amass_dir, ids_file, "train", bodymodel=bodymodel, seed=seed))
    for entry in args.image_npz:
        name, npz, img_dir = entry.split("=")
        add("image_to_pose", f"--image_npz {name}", lambda: HMR2ImageDataset(
            name, npz, img_dir, size, bodymodel, seed=seed))
    if args.bedlam_script_dir:
        add("image_text", "--bedlam_script_dir / --bedlam_img_dir", lambda: BEDLAMScript(
            args.bedlam_script_dir, args.bedlam_img_dir, "training", image_size=size, seed=seed))
    if args.llava_instruct_json:
        add("vqa", "--llava_instruct_json / --coco_dir", lambda: LLaVAInstruct(
            args.llava_instruct_json, args.coco_dir, size))
    if problems:
        raise SystemExit(f"--preset llava-1.5-7b: {len(problems)} problem(s) in the assets and data (nothing was "
                         "built or written):\n  - " + "\n  - ".join(problems))
    parts = [(d, w * len(d) / sum(len(x) for x in ds)) for w, ds in zip(args.real_mix, kinds.values()) for d in ds]
    return Mixture(parts, length=data.FRESH_DRAWS, seed=seed)  # every step draws afresh

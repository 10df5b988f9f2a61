"""Data: task samples, prompt/answer templates, the real datasets, the tiny word-level tokenizer, collate.

Pose-RFT (§4.1) trains on four kinds of data, turned into single-turn conversations:

| paper source (§4.1)                                     | task here       | built-in / real (this file) |
|---------------------------------------------------------|-----------------|-----------------------------|
| (1) text-pose: PoseScript                               | `text_to_pose`  | posebench captions / `PoseScript` |
| (2) image-pose: Human3.6M, MPI-INF-3DHP, COCO, MPII;    | `image_to_pose` | posebench renders / `HMR2ImageDataset` |
|     evaluated on 3DPW and Human3.6M                     |                 | (+ body.lsp14_* for the protocol) |
| (3) image-text: BEDLAM-Script                           | `vqa` (describe)| - / `BEDLAMScript`          |
| (4) VQA: LLaVA-Instruct-150k                            | `vqa`           | posebench yes/no VQA / `LLaVAInstruct` |

`PoseBenchTasks` mixes the built-in benchmark's three tasks into one deterministic `Dataset`;
the real datasets are `Dataset`s of the same `Sample`, mixed by `Mixture`, so templates,
tokenizer and `collate` serve them unchanged (the 7B preset; README, "Real runs on GPUs").

A sample and its encoding (B samples, T tokens, M images in a batch, J = 24 joints):

    image_to_pose  image (H, W, 3) uint8; pose6d (J, 6) and joints (J, 3) in the camera's view frame
        prompt  "<image>\\nWhat is the SMPL pose of the person in this image?"
        answer  "The SMPL pose of this person is <POSE>."
    text_to_pose   no image; pose6d and joints canonical (PoseScript's normalised orientation)
        prompt  "Generate the SMPL pose of a person described as follows: The left knee is raised ..."
        answer  the same pose answer
    vqa            image; no pose (pose6d None)
        prompt  "<image>\\nIs the left arm straight?"     answer  "Yes, the left arm is straight."

    collate -> <s> USER : <image> x num_image_tokens What is ... ? ASSISTANT : The SMPL ... <POSE> . </s>
    labels     -100 for <s>, the prompt and "ASSISTANT :"   | the answer ids and </s> | -100 for pads

The pose action p is 24 joints x 6D (Zhou et al. 2019), global orientation first (DESIGN.md).
The `<POSE>` token's last hidden state feeds the pose head; the answer template is the one the
paper's format reward checks by regular expression (§3.3, Eq. 9): `POSE_ANSWER_PATTERN`.

Departures from the paper's data:
1. The built-in default uses synthetic stand-ins (posebench.py) for every source: mannequin
   renders, automatic PoseScript-style captions, yes/no posecode VQA.
2. The paper does not state its task mixture or prompt wording; the mixture weights
   (0.4, 0.4, 0.2) and the prompt paraphrases below are ours.
3. The `tiny` preset speaks a word-level vocabulary built from every benchmark text (it
   cannot say a word the benchmark never uses); the paper uses LLaVA-1.5's Llama tokenizer.
4. Image-to-pose targets the camera-frame global orientation (as HMR2.0 does);
   text-to-pose targets the canonical one (PoseScript's convention; DESIGN.md).
5. Real data: SMPL+H / SMPL-X body joints are taken as SMPL's first 21, SMPL's two hand joints
   at identity; BEDLAM-Script serves as image -> description pairs (the paper does not say how
   it is used); LLaVA-Instruct's multi-turn conversations become single-turn samples.

Run:
    python data.py                    # build/load the tiny tokenizer, print one encoded sample per task
    python data.py --n_train 2000     # any BenchConfig field is a flag
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import body
import posebench

# ---- Templates: prompts, the pose answer (§3.3) and the chat format -------------------------

TASKS = ("image_to_pose", "text_to_pose", "vqa")
POSE_TASKS = ("image_to_pose", "text_to_pose")  # tasks whose answer holds <POSE> and whose target is a pose
IMAGE_TOKEN = "<image>"
POSE_TOKEN = "<POSE>"
POSE_ANSWER = "The SMPL pose of this person is <POSE>."  # the paper's answer template (§3.3 format reward)

# One element per token: a special token such as <POSE>, a word, or one punctuation character.
# The word-level tokenizer splits text the same way, so this defines "the same words".
_PIECE = re.compile(r"<[^<>\s]+>|\w+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Words and punctuation marks joined by single spaces: decoding a word-level encoding gives
    the original text up to whitespace ("Yes , the arm ." for "Yes, the arm."); both normalise
    to the same string."""
    return " ".join(_PIECE.findall(text))


def _template_regex(template: str) -> re.Pattern:
    """The template as a regex, any whitespace allowed around punctuation and special tokens,
    at least one whitespace between two words; anchored at both ends (use .match or .fullmatch)."""
    pieces = _PIECE.findall(template)
    pattern = re.escape(pieces[0])
    for prev, cur in zip(pieces, pieces[1:]):
        both_words = re.fullmatch(r"\w+", prev) and re.fullmatch(r"\w+", cur)
        pattern += (r"\s+" if both_words else r"\s*") + re.escape(cur)
    return re.compile(r"\A\s*" + pattern + r"\s*\Z")


POSE_ANSWER_PATTERN = _template_regex(POSE_ANSWER)  # Eq. 9: R_format = 1 if it matches the decoded answer

PROMPTS = {  # paraphrases, one drawn per sample; image prompts hold IMAGE_TOKEN once (LLaVA-1.5: image first)
    "image_to_pose": [
        "<image>\nWhat is the SMPL pose of the person in this image?",
        "<image>\nEstimate the 3D pose of the person in the image as SMPL parameters.",
        "<image>\nCould you give the SMPL pose of the person shown in this picture?",
        "<image>\nPlease predict the body pose of this person in SMPL format.",
    ],
    "text_to_pose": [
        "Generate the SMPL pose of a person described as follows: {caption}",
        "Here is a description of a body pose: {caption} Give the SMPL pose of this person.",
        "Create a 3D human pose in SMPL format that matches this description: {caption}",
        "{caption} What is the SMPL pose of a person who looks like this?",
    ],
    "vqa": ["<image>\n{question}"],
}


def chat_text(prompt: str, answer: str | None) -> str:
    """LLaVA-1.5's conversation format for one turn: "USER: {prompt} ASSISTANT:" (+ " {answer}")."""
    return f"USER: {prompt} ASSISTANT:" + (" " + answer if answer else "")


# ---- Samples --------------------------------------------------------------------------------

@dataclass
class Sample:
    """One single-turn example of any task, from any dataset. J = 24 joints.

    The caption (text_to_pose) or question (vqa) lives inside `prompt` and, alone, in `text`
    (the semantic reward and the retrieval metrics score the caption, not the prompt).
    """
    task: str                        # one of TASKS
    prompt: str                      # user turn; holds IMAGE_TOKEN once iff `image` is set
    answer: str                      # assistant turn; POSE_ANSWER for pose tasks
    image: np.ndarray | None = None  # (H, W, 3) uint8
    pose6d: np.ndarray | None = None  # (J, 6) float32 pose action target, global orientation first
    joints: np.ndarray | None = None  # (J, 3) float32 pelvis-centred joints of the target, metres
    index: int = -1                  # row of the pose in its split
    text: str = ""                   # the caption (text_to_pose) or question (vqa) alone


def pose_aa_to_6d(pose_aa: np.ndarray) -> np.ndarray:
    """(N, J, 3) axis-angle radians -> (N, J, 6) float32 pose actions (first two matrix columns)."""
    aa = torch.as_tensor(np.asarray(pose_aa, dtype=np.float32))
    return body.matrix_to_rot6d(body.axis_angle_to_matrix(aa)).numpy().astype(np.float32)


def _fill(template: str, **fields: str) -> str:
    """Fill {name} fields by plain replacement (a caption may hold any character)."""
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


# ---- PoseBench: the built-in benchmark's three tasks ----------------------------------------

class PoseBenchTasks(torch.utils.data.Dataset):
    """A deterministic mixture of image-to-pose, text-to-pose and VQA samples over one split.

    Sample i draws, from `np.random.default_rng((seed, i))`, in this order: the task (weights
    `mix`), the pose index, the caption or question of that pose, and the prompt paraphrase.
    So sample i depends on (split, cfg, tasks, mix, seed, i) only, not on `length`, the
    worker or the epoch; poses are drawn with replacement.

    Args:
        split: "train", "val" or "test".
        cfg: the benchmark configuration (default: posebench.BenchConfig()).
        tasks: which of TASKS to draw from.
        mix: one non-negative weight per entry of `tasks` (normalised to sum 1).
        seed: seed of the mixture (not of the benchmark, which `cfg.seed` fixes).
        length: number of samples (default: the number of poses N in the split).
    """

    def __init__(self, split: str, cfg: posebench.BenchConfig | None = None, tasks: Sequence[str] = TASKS,
                 mix: Sequence[float] = (0.4, 0.4, 0.2), seed: int = 0, length: int | None = None):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"PoseBenchTasks: tasks must be distinct names from {TASKS}, got {tasks}"
                             + (f" (unknown task {unknown[0]!r})" if unknown else ""))
        w = np.asarray(mix, dtype=np.float64)
        if w.ndim != 1 or len(w) != len(tasks):
            raise ValueError(f"PoseBenchTasks: mix needs one weight per task ({len(tasks)} for {tasks}), "
                             f"got {np.atleast_1d(w).tolist()}; e.g. mix=(1.0,) for a single task")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"PoseBenchTasks: mix weights must be finite, non-negative and not all zero, "
                             f"got {w.tolist()}")
        if length is not None and length < 1:
            raise ValueError(f"PoseBenchTasks: length must be >= 1, got {length}")
        self.tasks, self.mix, self.seed = tasks, w / w.sum(), seed
        self.data = posebench.load_split(split, cfg)
        n = len(self.data)
        self.length = n if length is None else int(length)
        # Targets of the whole split, once. Image-to-pose: the root in the camera's view frame.
        view = np.concatenate([self.data.global_orient_view[:, None], self.data.pose_aa[:, 1:]], 1)  # (N, J, 3)
        self.pose6d_view = pose_aa_to_6d(view)                # (N, J, 6)
        self.pose6d = pose_aa_to_6d(self.data.pose_aa)        # (N, J, 6) canonical

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        if not -self.length <= i < self.length:
            raise IndexError(f"PoseBenchTasks: index {i} out of range for length {self.length}")
        i = int(i) % self.length
        rng = np.random.default_rng((self.seed, i))
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.mix))]
        idx = int(rng.integers(len(self.data)))
        n_texts = {"text_to_pose": len(self.data.captions[idx]), "vqa": len(self.data.vqa[idx])}.get(task, 1)
        text_choice = int(rng.integers(n_texts))  # caption or question (image_to_pose: none)
        paraphrase = int(rng.integers(len(PROMPTS[task])))
        return self._sample(task, idx, text_choice, paraphrase)

    def eval_samples(self, task: str) -> list[Sample]:
        """One sample per pose of the split for `task` (first caption or question, first paraphrase)."""
        if task not in TASKS:
            raise ValueError(f"eval_samples: unknown task {task!r}; expected one of {TASKS}")
        return [self._sample(task, idx, 0, 0) for idx in range(len(self.data))]

    def _sample(self, task: str, idx: int, text_choice: int, paraphrase: int) -> Sample:
        template = PROMPTS[task][paraphrase]
        d = self.data
        if task == "image_to_pose":
            return Sample(task, template, POSE_ANSWER, image=np.array(d.images[idx]),
                          pose6d=self.pose6d_view[idx].copy(), joints=d.joints_view[idx].copy(), index=idx)
        if task == "text_to_pose":
            caption = d.captions[idx][text_choice]
            return Sample(task, _fill(template, caption=caption), POSE_ANSWER,
                          pose6d=self.pose6d[idx].copy(), joints=d.joints[idx].copy(), index=idx, text=caption)
        qa = d.vqa[idx][text_choice]
        return Sample(task, _fill(template, question=qa["question"]), qa["answer"],
                      image=np.array(d.images[idx]), index=idx, text=qa["question"])


# ---- Real datasets (§4.1): PoseScript, HMR2.0-style image npz, BEDLAM-Script, LLaVA-Instruct --
# Each yields `Sample`s, so templates, tokenizer and `collate` serve them unchanged. Images become
# one square person crop at the CLIP tower's size (`image_size`, 336 for LLaVA-1.5); the pose ViT
# takes its own 3:4 centre crop of it (model.crop_to_aspect), which is HMR2.0's input window.
# Every format problem raises an error naming the dataset, the file, the record and the schema.

POSESCRIPT_SOURCE = ("the PoseScript V2 release, https://download.europe.naverlabs.com/ComputerVision/PoseScript/"
                     "posescript_release_v2.zip (see github.com/naver/posescript)")
AMASS_SOURCE = "AMASS in the SMPL+H G format, https://amass.is.tue.mpg.de (PoseScript uses its 19 sub-datasets)"
HMR2_DATA_SOURCE = ("4D-Humans' hmr2_evaluation_data.tar.gz (its README, 'Evaluation': 3dpw_test.npz, h36m_val_p2.npz, "
                    "...), or training npz files in that schema or SPIN's (github.com/nkolot/SPIN, datasets/preprocess; "
                    "4D-Humans ships its training sets as webdataset tars, which are not read here), with each "
                    "dataset's own images")
BEDLAM_SCRIPT_SOURCE = ("PoseEmbroider's BEDLAM processing (github.com/naver/poseembroider, datasets/process_bedlam/"
                        "do.sh) run on BEDLAM (https://bedlam.is.tue.mpg.de)")
LLAVA_INSTRUCT_SOURCE = ("llava_instruct_150k.json from the Hugging Face dataset liuhaotian/LLaVA-Instruct-150K, "
                         "with COCO train2017 images (https://cocodataset.org)")
DESCRIBE_PROMPT = "<image>\nDescribe the body pose of the person in this image."


class DataFormatError(ValueError):
    """A dataset file that does not follow its schema."""


def _where(dataset: str, path, record=None) -> str:
    return f"{dataset}: {path}" + ("" if record is None else f", record {record!r}")


def _need(dataset: str, path: str, what: str, source: str) -> str:
    """`path` if it exists, else FileNotFoundError naming the dataset, the file and its source."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: {what} {path} not found; it comes from {source}")
    return path


def _read_json(dataset: str, path: str, source: str, schema: str):
    import json

    _need(dataset, path, "file", source)
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as err:
        raise DataFormatError(f"{_where(dataset, path)}: not valid JSON ({err}); expected {schema}") from None


def _read_pickle(dataset: str, path: str, source: str):
    """A pickle of numpy arrays and builtins, read without importing anything else it names."""
    import pickle

    from smpl_pickle import _allowed_globals

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "tuple"), ("builtins", "list")):
                return super().find_class(module, name)
            target = _allowed_globals().get((module, name))
            if target is None:
                raise DataFormatError(f"{_where(dataset, path)}: holds a {module}.{name} object; expected only "
                                      "numpy arrays, numbers, strings, lists and dicts")
            return target

    with open(_need(dataset, path, "file", source), "rb") as fh:
        return Restricted(fh, encoding="latin1").load()


def _rotz(angle_rad: np.ndarray) -> np.ndarray:
    """(N,) -> (N, 3, 3) rotations about +z."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    R = np.zeros((len(angle_rad), 3, 3))
    R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], R[:, 2, 2] = c, -s, s, c, 1
    return R


def posescript_normalize(global_orient: np.ndarray) -> np.ndarray:
    """PoseScript's orientation normalisation (naver/posescript text2pose/utils.py,
    get_pose_data_from_file): write the root rotation as R = Rz(tz) Ry(ty) Rx(tx) in AMASS's
    z-up world and drop tz, i.e. Rz(-tz) R with tz = atan2(R[1, 0], R[0, 0]): no rotation about
    the vertical axis is left. (N, 3) axis-angle -> (N, 3) axis-angle, radians."""
    R = body.axis_angle_to_matrix(torch.as_tensor(np.asarray(global_orient, dtype=np.float64))).numpy()
    tz = np.arctan2(R[:, 1, 0], R[:, 0, 0])
    return body.matrix_to_axis_angle(torch.as_tensor(_rotz(-tz) @ R)).numpy()


def smplh_to_smpl24(poses: np.ndarray) -> np.ndarray:
    """(N, 156) SMPL+H axis-angle (global orientation, 21 body joints, 30 hand joints) -> (N, 24, 3):
    the first 22 joints, and identity for SMPL's two hand joints (22, 23), which SMPL+H replaces by
    MANO's fingers."""
    out = np.zeros((len(poses), body.NUM_JOINTS, 3), dtype=np.float64)
    out[:, :22] = np.asarray(poses, dtype=np.float64)[:, :66].reshape(-1, 22, 3)
    return out


_Y_UP = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # Rx(-pi/2): AMASS's z-up world -> SMPL's y-up


def _targets(pose_aa: np.ndarray, bodymodel=None, betas=None):
    """(N, 24, 3) axis-angle -> pose6d (N, 24, 6) and, with a BodyModel, pelvis-centred joints (N, 24, 3) m."""
    pose6d = pose_aa_to_6d(pose_aa)
    if bodymodel is None:
        return pose6d, None
    with torch.no_grad():
        aa = torch.as_tensor(pose_aa, dtype=torch.float32)
        b = None if betas is None else torch.as_tensor(np.asarray(betas, dtype=np.float32)[:, :body.NUM_BETAS])
        j = bodymodel(aa[:, 0], aa[:, 1:], b).joints
    return pose6d, (j - j[:, :1]).numpy().astype(np.float32)


class PoseScript(torch.utils.data.Dataset):
    """text_to_pose samples from PoseScript (Delmas et al. 2022) on AMASS poses (§4.1 (1)).

    Files, as naver/posescript's text2pose/config.py and data.py read them:
        root/ids_2_dataset_sequence_and_frame_index_100k.json  {"<pose id>": ["AMASS", "<sequence npz>", frame]}
        root/{split}_ids_100k.json                             [pose id, ...]
        root/posescript_human_6293.json, posescript_auto_100k.json  {"<pose id>": caption or [captions]}
        amass_root/<sequence npz>                               'poses' (T, 156): SMPL+H axis-angle, radians
    A pose of the split counts if one of the chosen caption files describes it ("human" alone is
    PoseScript-H2, the paper's text-to-pose test set). The target is SMPL's 24 joints (hands at
    identity), the global orientation normalised about the vertical axis as PoseScript does
    (`posescript_normalize`), in AMASS's z-up frame (PoseScript's, which its retrieval models
    expect) or, with `y_up`, in SMPL's y-up frame (posebench's canonical one).

    Args:
        root: the PoseScript release directory. amass_root: AMASS's SMPL+H G directory.
        split: train, val or test. captions: "human", "auto" or both.
        bodymodel: a body.BodyModel to fill `joints` (None: joints stay None).
        seed: seed of the caption and prompt draws (sample i depends on (seed, i) only).
    """

    NAME = "PoseScript"
    CAPTION_FILES = {"human": "posescript_human_6293.json", "auto": "posescript_auto_100k.json"}
    IDS_FILE = "ids_2_dataset_sequence_and_frame_index_100k.json"

    def __init__(self, root: str, amass_root: str, split: str = "train", captions: Sequence[str] = ("human", "auto"),
                 bodymodel=None, y_up: bool = False, seed: int = 0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"{self.NAME}: split must be train, val or test, got {split!r}")
        bad = [c for c in captions if c not in self.CAPTION_FILES]
        if bad or not captions:
            raise ValueError(f"{self.NAME}: captions must be among {tuple(self.CAPTION_FILES)}, got {tuple(captions)}")
        _need(self.NAME, root, "release directory", POSESCRIPT_SOURCE)
        self.amass_root = _need(self.NAME, amass_root, "AMASS directory", AMASS_SOURCE)
        self.bodymodel, self.y_up, self.seed = bodymodel, y_up, seed
        ids_path = os.path.join(root, self.IDS_FILE)
        info = _read_json(self.NAME, ids_path, POSESCRIPT_SOURCE, '{"<pose id>": ["AMASS", "<npz path>", frame]}')
        split_path = os.path.join(root, f"{split}_ids_100k.json")
        split_ids = _read_json(self.NAME, split_path, POSESCRIPT_SOURCE, "a list of pose ids")
        if not isinstance(info, dict) or not isinstance(split_ids, list):
            raise DataFormatError(f"{self.NAME}: {ids_path} must hold a dict and {split_path} a list")
        texts: dict[int, list[str]] = {}
        for c in captions:
            path = os.path.join(root, self.CAPTION_FILES[c])
            for key, val in _read_json(self.NAME, path, POSESCRIPT_SOURCE, '{"<pose id>": caption or [captions]}').items():
                vals = val if isinstance(val, list) else [val]
                if not key.lstrip("-").isdigit() or not all(isinstance(v, str) for v in vals):
                    raise DataFormatError(f"{_where(self.NAME, path, key)}: expected an integer pose id mapped to "
                                          f"a caption or a list of captions, got {type(val).__name__}")
                texts.setdefault(int(key), []).extend(vals)
        self.ids, self.captions, self.refs = [], [], []
        for pid in split_ids:
            if not isinstance(pid, int):
                raise DataFormatError(f"{_where(self.NAME, split_path, pid)}: pose ids must be integers")
            if not texts.get(pid):
                continue
            ref = info.get(str(pid))
            if ref is None:
                raise DataFormatError(f"{_where(self.NAME, ids_path, str(pid))}: pose id of {split_path} missing")
            if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[1], str) and isinstance(ref[2], int)):
                raise DataFormatError(f"{_where(self.NAME, ids_path, str(pid))}: got {ref!r}; expected "
                                      '["AMASS", "<sequence npz path>", frame index]')
            if ref[0] != "AMASS":
                raise DataFormatError(f"{_where(self.NAME, ids_path, str(pid))}: dataset {ref[0]!r} unknown; "
                                      "PoseScript poses come from 'AMASS'")
            self.ids.append(pid)
            self.captions.append(texts[pid])
            self.refs.append((ref[1], ref[2]))
        if not self.ids:
            raise DataFormatError(f"{self.NAME}: no pose of {split_path} has a caption in {list(captions)}")
        self._sequences = collections.OrderedDict()  # a small cache of decoded 'poses' arrays

    def __len__(self) -> int:
        return len(self.ids)

    def pose_aa(self, i: int) -> np.ndarray:
        """The target of pose i: (24, 3) axis-angle, radians, orientation normalised."""
        rel, frame = self.refs[i]
        path = os.path.join(self.amass_root, rel)
        poses = self._sequences.get(path)
        if poses is None:
            _need(self.NAME, path, f"AMASS sequence of pose {self.ids[i]}", AMASS_SOURCE)
            with np.load(path) as z:
                if "poses" not in z.files:
                    raise DataFormatError(f"{_where(self.NAME, path)}: no 'poses' array (keys {z.files}); expected "
                                          "an AMASS SMPL+H G npz with 'poses' (T, 156)")
                poses = z["poses"]
            if poses.ndim != 2 or poses.shape[1] != 156:
                raise DataFormatError(f"{_where(self.NAME, path)}: 'poses' has shape {poses.shape}; expected (T, 156), "
                                      "SMPL+H's 52 joints x 3 (the SMPL+H G format)")
            self._sequences[path] = poses
            if len(self._sequences) > 64:
                self._sequences.popitem(last=False)
        if not 0 <= frame < len(poses):
            raise DataFormatError(f"{_where(self.NAME, path, self.ids[i])}: frame {frame} out of range for "
                                  f"{len(poses)} frames")
        aa = smplh_to_smpl24(poses[frame][None])[0]  # (24, 3)
        aa[0] = posescript_normalize(aa[:1])[0]
        if self.y_up:
            R = _Y_UP @ body.axis_angle_to_matrix(torch.as_tensor(aa[:1])).numpy()[0]
            aa[0] = body.matrix_to_axis_angle(torch.as_tensor(R[None])).numpy()[0]
        return aa

    def __getitem__(self, i: int) -> Sample:
        rng = np.random.default_rng((self.seed, int(i)))
        return self.sample(int(i), int(rng.integers(len(self.captions[i]))), int(rng.integers(len(PROMPTS["text_to_pose"]))))

    def sample(self, i: int, caption: int = 0, paraphrase: int = 0) -> Sample:
        """Pose i with its caption `caption`, in prompt paraphrase `paraphrase`."""
        pose6d, joints = _targets(self.pose_aa(i)[None], self.bodymodel)
        text = self.captions[i][caption]
        return Sample("text_to_pose", _fill(PROMPTS["text_to_pose"][paraphrase], caption=text), POSE_ANSWER,
                      pose6d=pose6d[0], joints=None if joints is None else joints[0], index=i, text=text)


def expand_to_aspect(box_wh: np.ndarray, aspect_wh=(192, 256)) -> np.ndarray:
    """(N, 2) box sizes -> the smallest boxes of aspect w : h that contain them (HMR2.0's
    expand_to_aspect_ratio with its ViT's 192 x 256 BBOX_SHAPE)."""
    w, h = np.asarray(box_wh, dtype=np.float64).T
    tw, th = aspect_wh
    return np.stack([np.maximum(w, h * tw / th), np.maximum(h, w * th / tw)], -1)


def crop_person(image: np.ndarray, center, box_wh, size: int) -> np.ndarray:
    """HMR2.0's person crop at `size`: the square of side max(box expanded to 3 : 4) centred on
    `center`, black outside the image, resized (bilinear). Its centre 3 : 4 region is exactly the
    expanded box, the window HMR2.0's ViT sees. (H, W, 3) uint8 -> (size, size, 3) uint8."""
    from PIL import Image

    side = float(expand_to_aspect(np.asarray(box_wh, dtype=np.float64).reshape(1, 2)).max())
    x0, y0 = float(center[0]) - side / 2, float(center[1]) - side / 2
    box = tuple(int(round(v)) for v in (x0, y0, x0 + side, y0 + side))
    return np.asarray(Image.fromarray(image).crop(box).resize((size, size), Image.BILINEAR))


def _load_rgb(dataset: str, path: str, where: str, source: str) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: image {path} of {where} not found; the images come from {source}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class HMR2ImageDataset(torch.utils.data.Dataset):
    """image_to_pose samples from an HMR2.0-style npz (§4.1 (2): Human3.6M, MPI-INF-3DHP, COCO,
    MPII for training; 3DPW and Human3.6M for evaluation).

    Schema (4D-Humans hmr2/datasets/image_dataset.py), N records:
        imgname (N,) str, relative to img_dir     center (N, 2) pixels
        scale (N,) or (N, 2): box size in pixels (4D-Humans' files; `scale_in_200px` for SPIN-style /200)
        body_pose (N, 72) axis-angle, global orientation first, camera frame; has_body_pose (N,)
        betas (N, 10), has_betas (N,)                              optional
        body_keypoints_2d (N, 25, 3), extra_keypoints_2d (N, 19, 3)  optional
        body_keypoints_3d (N, 25, 4), extra_keypoints_3d (N, 19, 4)  optional, metres + confidence
    SPIN's files (pose (N, 72), shape (N, 10), has_smpl (N,), scale = box / 200) are read as the
    same fields. Records without a pose (has_body_pose 0: 2D-only COCO/MPII annotations) are
    skipped. Other keys are ignored.

    Args:
        name: the dataset's name in messages ("3DPW", "H36M", ...). npz_path, img_dir: its files.
        image_size: side of the square crop (the CLIP tower's input, 336 for LLaVA-1.5).
        bodymodel: a body.BodyModel to fill `joints` from pose and betas (None: joints stay None).
    """

    SCHEMA = ("imgname (N,), center (N, 2), scale (N,) or (N, 2), body_pose (N, 72), has_body_pose (N,) "
              "[+ optional betas (N, 10), has_betas (N,), body_keypoints_2d (N, 25, 3), extra_keypoints_2d "
              "(N, 19, 3), body_keypoints_3d (N, 25, 4), extra_keypoints_3d (N, 19, 4)]")
    SHAPES = {"center": (2,), "body_pose": (72,), "has_body_pose": (), "betas": (10,), "has_betas": (),
              "body_keypoints_2d": (25, 3), "extra_keypoints_2d": (19, 3), "body_keypoints_3d": (25, 4),
              "extra_keypoints_3d": (19, 4)}

    def __init__(self, name: str, npz_path: str, img_dir: str, image_size: int = 336, bodymodel=None,
                 scale_in_200px: bool = False, seed: int = 0):
        self.name, self.npz_path, self.image_size, self.bodymodel, self.seed = name, npz_path, image_size, bodymodel, seed
        _need(name, npz_path, "annotation file", HMR2_DATA_SOURCE)
        self.img_dir = _need(name, img_dir, "image directory", HMR2_DATA_SOURCE)
        with np.load(npz_path, allow_pickle=False) as z:
            keys = set(z.files)
            spin = "body_pose" not in keys and {"pose", "has_smpl"} <= keys  # SPIN's names for the same fields
            alias = {"body_pose": "pose", "has_body_pose": "has_smpl", "betas": "shape", "has_betas": "has_smpl"} \
                if spin else {}
            keys |= {k for k, v in alias.items() if v in keys}
            missing = [k for k in ("imgname", "center", "scale", "body_pose", "has_body_pose") if k not in keys]
            if missing:
                raise DataFormatError(f"{_where(name, npz_path)}: missing {missing} (keys: {sorted(keys)}); "
                                      f"expected {self.SCHEMA}")
            arr = {k: z[alias.get(k, k)] for k in ["imgname", "scale", *self.SHAPES] if k in keys}
        scale_in_200px = scale_in_200px or spin
        N = len(arr["imgname"])
        for k, tail in self.SHAPES.items():
            if k in arr and arr[k].shape != (N, *tail):
                raise DataFormatError(f"{_where(name, npz_path)}: {k} has shape {arr[k].shape}; expected "
                                      f"{(N, *tail)} for {N} records ({self.SCHEMA})")
        scale = arr["scale"].reshape(N, -1) if arr["scale"].size in (N, 2 * N) else None
        if scale is None:
            raise DataFormatError(f"{_where(name, npz_path)}: scale has shape {arr['scale'].shape}; expected ({N},) "
                                  f"or ({N}, 2)")
        self.box_wh = np.broadcast_to(scale * (200.0 if scale_in_200px else 1.0), (N, 2)).astype(np.float64)
        self.arr = arr
        self.rows = np.flatnonzero(arr["has_body_pose"] > 0)  # records with a pose target
        if len(self.rows) == 0:
            raise DataFormatError(f"{_where(name, npz_path)}: no record has has_body_pose > 0")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        paraphrase = int(np.random.default_rng((self.seed, int(i))).integers(len(PROMPTS["image_to_pose"])))
        return self.sample(int(i), paraphrase)

    def sample(self, i: int, paraphrase: int = 0) -> Sample:
        r = int(self.rows[i])
        a = self.arr
        rel = a["imgname"][r]
        rel = rel.decode() if isinstance(rel, bytes) else str(rel)
        pose = a["body_pose"][r].astype(np.float64).reshape(1, body.NUM_JOINTS, 3)
        if not np.isfinite(pose).all() or not np.isfinite(a["center"][r]).all() or not (self.box_wh[r] > 0).all():
            raise DataFormatError(f"{_where(self.name, self.npz_path, r)} ({rel}): non-finite pose or center, or a "
                                  f"box size <= 0 ({self.box_wh[r]})")
        image = _load_rgb(self.name, os.path.join(self.img_dir, rel), f"record {r} of {self.npz_path}", HMR2_DATA_SOURCE)
        crop = crop_person(image, a["center"][r], self.box_wh[r], self.image_size)
        betas = a["betas"][r:r + 1] if "betas" in a and a.get("has_betas", np.ones(r + 1))[r] > 0 else None
        pose6d, joints = _targets(pose, self.bodymodel, betas)
        return Sample("image_to_pose", PROMPTS["image_to_pose"][paraphrase], POSE_ANSWER, image=crop,
                      pose6d=pose6d[0], joints=None if joints is None else joints[0], index=i)

    def gt_lsp14(self) -> np.ndarray:
        """HMR2.0's evaluation target of every pose record: the 14 LSP joints of the npz's
        `extra_keypoints_3d` (its keypoints 25..37 and 43), minus its pelvis (keypoint 39), metres,
        (N, 14, 3) in the order of this dataset's samples."""
        if "extra_keypoints_3d" not in self.arr:
            raise DataFormatError(f"{_where(self.name, self.npz_path)}: no extra_keypoints_3d (N, 19, 4); HMR2.0's "
                                  "protocol reads its 3D ground truth there (else use body.lsp14_from_vertices)")
        kp = self.arr["extra_keypoints_3d"][self.rows, :, :3].astype(np.float64)  # (N, 19, 3) m
        _, lsp14, pelvis = body.REGRESSOR_LAYOUTS[19]
        return kp[:, list(lsp14)] - kp[:, pelvis:pelvis + 1]


class BEDLAMScript(torch.utils.data.Dataset):
    """Image-text samples of BEDLAM-Script (PoseEmbroider, Delmas et al. 2024; §4.1 (3)).

    Files, as PoseEmbroider's processing writes them and its datasets/bedlam.py reads them
    (the full set, not a farther-sampled subset), split = "training" or "validation":
        processed_dir/bedlam_{split}_try.pkl    {image path: [per human: {"smplx_root_cam" (3,),
            "smplx_global_orient" (3,), "smplx_body_pose" (63,), "smplx_tight_bbox" (4,) x1 y1 x2 y2, ...}]}
        processed_dir/imgpaths_bedlam_to_selected_human_index_{split}_try.pkl
                                                 {"criteria": {"scale_factor": s, ...}, image path: [human index]}
        processed_dir/bedlam_{split}_3caps_try.pkl   {data id: [3 captions]}
        img_dir/{split}/<image path>             (`closeup` images are stored turned 90 deg: turned back)
    Data ids count the selected humans over the sorted image paths. task "describe" gives vqa-kind
    samples (image -> the caption, no pose); task "image_to_pose" gives the camera-frame pose
    (SMPL-X's 21 body joints as SMPL's, hands at identity).
    """

    NAME = "BEDLAM-Script"
    HUMAN_KEYS = ("smplx_root_cam", "smplx_body_pose", "smplx_tight_bbox")

    def __init__(self, processed_dir: str, img_dir: str, split: str = "training", task: str = "describe",
                 image_size: int = 336, bodymodel=None, seed: int = 0):
        split = {"train": "training", "val": "validation"}.get(split, split)
        if split not in ("training", "validation") or task not in ("describe", "image_to_pose"):
            raise ValueError(f"{self.NAME}: split must be training or validation and task describe or "
                             f"image_to_pose, got {split!r}, {task!r}")
        self.task, self.image_size, self.bodymodel, self.seed = task, image_size, bodymodel, seed
        self.img_dir = os.path.join(_need(self.NAME, img_dir, "image directory", BEDLAM_SCRIPT_SOURCE), split)
        ann_path = os.path.join(processed_dir, f"bedlam_{split}_try.pkl")
        sel_path = os.path.join(processed_dir, f"imgpaths_bedlam_to_selected_human_index_{split}_try.pkl")
        cap_path = os.path.join(processed_dir, f"bedlam_{split}_3caps_try.pkl")
        ann = _read_pickle(self.NAME, ann_path, BEDLAM_SCRIPT_SOURCE)
        sel = dict(_read_pickle(self.NAME, sel_path, BEDLAM_SCRIPT_SOURCE))
        caps = _read_pickle(self.NAME, cap_path, BEDLAM_SCRIPT_SOURCE)
        criteria = sel.pop("criteria", None)
        if not isinstance(criteria, dict) or "scale_factor" not in criteria:
            raise DataFormatError(f"{_where(self.NAME, sel_path, 'criteria')}: expected a dict with 'scale_factor'")
        self.scale_factor = float(criteria["scale_factor"])
        self.items = []  # (image path, human dict, captions)
        data_id = 0
        for img in sorted(ann):
            for h in sel.get(img, []):
                humans = ann[img]
                if not isinstance(h, (int, np.integer)) or not 0 <= h < len(humans):
                    raise DataFormatError(f"{_where(self.NAME, sel_path, img)}: human index {h!r} out of range for "
                                          f"{len(humans)} humans in {ann_path}")
                human = humans[h]
                missing = [k for k in self.HUMAN_KEYS if k not in human]
                shapes = {k: np.shape(human[k]) for k in self.HUMAN_KEYS if k in human}
                if missing or shapes != {"smplx_root_cam": (3,), "smplx_body_pose": (63,), "smplx_tight_bbox": (4,)}:
                    raise DataFormatError(f"{_where(self.NAME, ann_path, f'{img} human {h}')}: missing {missing}, "
                                          f"shapes {shapes}; expected smplx_root_cam (3,), smplx_body_pose (63,), "
                                          "smplx_tight_bbox (4,)")
                texts = caps.get(data_id) if isinstance(caps, dict) else None
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise DataFormatError(f"{_where(self.NAME, cap_path, data_id)}: expected a list of captions for "
                                          f"data id {data_id} ({img}, human {h})")
                self.items.append((img, human, list(texts)))
                data_id += 1
        if not self.items:
            raise DataFormatError(f"{self.NAME}: {sel_path} selects no human")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        rng = np.random.default_rng((self.seed, int(i)))
        caption = int(rng.integers(len(self.items[i][2])))
        return self.sample(int(i), caption, int(rng.integers(len(PROMPTS["image_to_pose"]))))

    def sample(self, i: int, caption: int = 0, paraphrase: int = 0) -> Sample:
        from PIL import Image

        img, human, texts = self.items[i]
        image = _load_rgb(self.NAME, os.path.join(self.img_dir, img), f"item {i}", BEDLAM_SCRIPT_SOURCE)
        if "closeup" in img:  # stored turned; PoseEmbroider turns them back by 90 deg clockwise
            image = np.asarray(Image.fromarray(image).transpose(Image.Transpose.ROTATE_270))
        x1, y1, x2, y2 = np.asarray(human["smplx_tight_bbox"], dtype=np.float64)
        pad = (self.scale_factor - 1) * np.hypot(x2 - x1, y2 - y1) / 2  # PoseEmbroider's get_scaled_bbox margin
        crop = crop_person(image, ((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1 + 2 * pad, y2 - y1 + 2 * pad), self.image_size)
        text = texts[caption]
        if self.task == "describe":
            return Sample("vqa", DESCRIBE_PROMPT, text, image=crop, index=i, text=DESCRIBE_PROMPT.split("\n", 1)[1])
        aa = np.zeros((1, body.NUM_JOINTS, 3))
        aa[0, 0] = np.asarray(human["smplx_root_cam"], dtype=np.float64)
        aa[0, 1:22] = np.asarray(human["smplx_body_pose"], dtype=np.float64).reshape(21, 3)
        pose6d, joints = _targets(aa, self.bodymodel)
        return Sample("image_to_pose", PROMPTS["image_to_pose"][paraphrase], POSE_ANSWER, image=crop,
                      pose6d=pose6d[0], joints=None if joints is None else joints[0], index=i)


def pad_to_square(image: np.ndarray, size: int, fill=(122, 116, 104)) -> np.ndarray:
    """LLaVA-1.5's "pad" preprocessing: centre the image on a square of CLIP's mean colour, resize.
    (H, W, 3) uint8 -> (size, size, 3) uint8."""
    from PIL import Image

    H, W = image.shape[:2]
    S = max(H, W)
    canvas = Image.new("RGB", (S, S), tuple(fill))
    canvas.paste(Image.fromarray(image), ((S - W) // 2, (S - H) // 2))
    return np.asarray(canvas.resize((size, size), Image.BICUBIC))


class LLaVAInstruct(torch.utils.data.Dataset):
    """vqa samples from LLaVA-Instruct-150k (§4.1 (4)).

    Schema (llava_instruct_150k.json): a list of {"id": str, "image": "<file in image_dir>",
    "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.
    Each human/gpt pair becomes one single-turn sample with the image (the `<image>` mark moved to
    the front, LLaVA-1.5's order); a record without "image" gives text-only samples. Departure:
    later turns lose the earlier ones as context (our chat template is single-turn).
    """

    NAME = "LLaVA-Instruct-150k"

    def __init__(self, json_path: str, image_dir: str, image_size: int = 336):
        self.image_dir = _need(self.NAME, image_dir, "image directory", LLAVA_INSTRUCT_SOURCE)
        self.json_path, self.image_size = json_path, image_size
        records = _read_json(self.NAME, json_path, LLAVA_INSTRUCT_SOURCE, "a list of conversation records")
        schema = ('{"id", "image" (optional), "conversations": [{"from": "human", "value"}, {"from": "gpt", '
                  '"value"}, ...]}')
        if not isinstance(records, list):
            raise DataFormatError(f"{_where(self.NAME, json_path)}: expected a list of records {schema}")
        self.turns = []  # (record index, image file or None, question, answer)
        for k, rec in enumerate(records):
            rid = rec.get("id", k) if isinstance(rec, dict) else k
            conv = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
                raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: expected {schema}")
            for t in range(0, len(conv), 2):
                q, a = conv[t], conv[t + 1]
                if not (isinstance(q, dict) and isinstance(a, dict) and q.get("from") == "human"
                        and a.get("from") == "gpt" and isinstance(q.get("value"), str) and isinstance(a.get("value"), str)):
                    raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: turn {t} is not a human/gpt pair "
                                          f"with string values; expected {schema}")
                question = " ".join(q["value"].replace(IMAGE_TOKEN, " ").split())
                self.turns.append((k, rec.get("image"), question, a["value"].strip()))
        if not self.turns:
            raise DataFormatError(f"{_where(self.NAME, json_path)}: no conversation records")

    def __len__(self) -> int:
        return len(self.turns)

    def __getitem__(self, i: int) -> Sample:
        k, image_file, question, answer = self.turns[i]
        if image_file is None:
            return Sample("vqa", question, answer, index=i, text=question)
        image = _load_rgb(self.NAME, os.path.join(self.image_dir, image_file), f"record {k} of {self.json_path}",
                          LLAVA_INSTRUCT_SOURCE)
        return Sample("vqa", IMAGE_TOKEN + "\n" + question, answer, image=pad_to_square(image, self.image_size),
                      index=i, text=question)


class Mixture(torch.utils.data.Dataset):
    """A deterministic weighted mixture of datasets: sample i draws a dataset (by weight), then a
    uniform index into it, from np.random.default_rng((seed, i)).

    Args:
        parts: (dataset, weight) pairs, weights non-negative, not all zero. length: samples.
    """

    def __init__(self, parts, length: int, seed: int = 0):
        if not parts:
            raise ValueError("Mixture: no datasets")
        w = np.asarray([float(p[1]) for p in parts])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"Mixture: weights must be finite, non-negative, not all zero: {w.tolist()}")
        self.datasets, self.p, self.length, self.seed = [p[0] for p in parts], w / w.sum(), int(length), seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        rng = np.random.default_rng((self.seed, int(i)))
        ds = self.datasets[int(rng.choice(len(self.datasets), p=self.p))]
        return ds[int(rng.integers(len(ds)))]


# ---- The tiny preset's tokenizer: word-level, built from every benchmark text ---------------

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, POSE_TOKEN)  # ids 0..5 in this order
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a `tokenizers` one, with the special tokens named;
    `image_token_id` and `pose_token_id` become attributes. No bos/eos are added on encode."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "pose_token": POSE_TOKEN},
        clean_up_tokenization_spaces=True)  # decode "pose ." as "pose."


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark of `texts`.

    Text splits on whitespace, then every punctuation character is its own token; case is kept.
    The special tokens (`SPECIAL_TOKENS`, ids 0-5) are matched before that split, so "<POSE>"
    and "<image>" are single ids. Words are ordered by frequency, then alphabetically, so the
    same texts (in any order) give the same ids. Being special, <POSE> is dropped by
    `decode(..., skip_special_tokens=True)`: decode generated answers (cut at eos) without it
    before the format reward's regex.
    """
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    chunks = collections.Counter()  # whitespace-separated chunks first: few distinct ones, fast
    for text in texts:
        for piece in _SPECIAL_SPLIT.split(text):
            if piece not in SPECIAL_TOKENS:
                chunks.update(piece.split())
    counts = collections.Counter()
    for chunk, n in chunks.items():
        for word, _ in pre.pre_tokenize_str(chunk):
            counts[word] += n
    words = sorted(counts, key=lambda word: (-counts[word], word))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _wrap(tok)


def _template_texts() -> list[str]:
    """The fixed words of every template (fields left out)."""
    fixed = [re.sub(r"\{\w+\}", " ", p) for ps in PROMPTS.values() for p in ps]
    return fixed + [POSE_ANSWER, chat_text("", None)]


def benchmark_texts(cfg: posebench.BenchConfig | None = None) -> list[str]:
    """Every text the tiny model must read or write on the benchmark `cfg`: the templates, every
    prompt of every split with each of its captions or questions filled in, every answer.
    Returns the distinct texts, sorted."""
    texts = set(_template_texts())
    for split in posebench.SPLITS:
        d = posebench.load_split(split, cfg)
        texts.update(PROMPTS["image_to_pose"])
        for captions in d.captions:
            texts.update(_fill(p, caption=c) for c in captions for p in PROMPTS["text_to_pose"])
        for qas in d.vqa:
            texts.update(_fill(p, question=qa["question"]) for qa in qas for p in PROMPTS["vqa"])
            texts.update(qa["answer"] for qa in qas)
    texts.add(POSE_ANSWER)
    return sorted(texts)


def tiny_tokenizer(cfg: posebench.BenchConfig | None = None) -> PreTrainedTokenizerFast:
    """`build_tokenizer(benchmark_texts(cfg))`, built once per benchmark configuration and cached
    at <cache_dir>/tokenizers/<config_key>/tokenizer.json (written atomically).

    A cached file that cannot encode this file's templates (they changed since it was written)
    is rebuilt.
    """
    cfg = cfg or posebench.BenchConfig()
    path = os.path.join(body.cache_dir(), "tokenizers", posebench.config_key(cfg), "tokenizer.json")
    if os.path.exists(path):
        tok = _wrap(Tokenizer.from_file(path))
        if tok.unk_token_id not in sum(tok(_template_texts(), add_special_tokens=False)["input_ids"], []):
            return tok
    tok = build_tokenizer(benchmark_texts(cfg))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(tok.backend_tokenizer.to_str())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tok


# ---- Collate: samples -> one padded batch ---------------------------------------------------

@dataclass
class Batch:
    """A padded batch. B samples, T tokens, M = samples with an image, J = 24 joints."""
    input_ids: torch.Tensor             # (B, T) long
    attention_mask: torch.Tensor        # (B, T) long, 0 at pads
    labels: torch.Tensor                # (B, T) long, -100 except the answer ids and the final eos
    pixel_values: torch.Tensor | None   # (M, 3, H, W) float in [-1, 1], image samples in batch order
    pose6d: torch.Tensor                # (B, J, 6) float, zeros where there is no pose
    joints: torch.Tensor                # (B, J, 3) float metres, zeros where there is no pose
    pose_valid: torch.Tensor            # (B,) bool: the sample has a pose target
    pose_token_pos: torch.Tensor        # (B,) long: position of <POSE> in input_ids, -1 if absent
    tasks: list[str]                    # (B,)

    def to(self, device) -> "Batch":
        """The batch with every tensor on `device`."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if torch.is_tensor(getattr(self, f.name))})


def images_to_pixels(images: np.ndarray, device="cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]: what both vision towers take."""
    x = torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2).float()  # copy: memmaps are read-only
    return (x / 255 - 0.5) / 0.5


def collate(samples: list[Sample], tokenizer: PreTrainedTokenizerFast, num_image_tokens: int,
            add_answer: bool = True, pad_side: str = "right") -> Batch:
    """Encode samples as bos + chat_text(prompt, answer) + eos and pad them into a `Batch`.

    IMAGE_TOKEN in a prompt becomes `num_image_tokens` image ids (LLaVA: one placeholder per
    visual token). The prompt and the answer are encoded separately and concatenated, so the
    prompt-only encoding (add_answer=False, used by generation with pad_side="left") is a
    prefix of the full one. Only the answer ids and the eos are supervised.

    Raises:
        ValueError: an image sample whose prompt does not hold IMAGE_TOKEN exactly once, a
            text-only prompt holding it, a prompt holding POSE_TOKEN, a pose task's answer
            without exactly one POSE_TOKEN (when add_answer), images of different sizes, or a
            tokenizer that does not encode IMAGE_TOKEN / POSE_TOKEN as single ids.
    """
    if not samples:
        raise ValueError("collate: no samples")
    if pad_side not in ("left", "right"):
        raise ValueError(f"collate: pad_side must be 'left' or 'right', got {pad_side!r}")
    if num_image_tokens < 1:
        raise ValueError(f"collate: num_image_tokens must be >= 1, got {num_image_tokens}")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("collate: the tokenizer needs a pad and an eos token")
    for k, s in enumerate(samples):
        where = f"collate: sample {k} ({s.task}, pose {s.index})"
        n_img = s.prompt.count(IMAGE_TOKEN)
        if s.image is not None and n_img != 1:
            raise ValueError(f"{where} has an image but its prompt holds {n_img} {IMAGE_TOKEN} "
                             f"(expected exactly 1): {s.prompt!r}")
        if s.image is None and n_img:
            raise ValueError(f"{where} has no image but its prompt holds {IMAGE_TOKEN}: {s.prompt!r}")
        if s.image is not None and (s.image.ndim != 3 or s.image.shape[2] != 3):
            raise ValueError(f"{where}: image has shape {s.image.shape}, expected (H, W, 3)")
        if POSE_TOKEN in s.prompt:
            raise ValueError(f"{where}: the prompt holds {POSE_TOKEN}; only answers may: {s.prompt!r}")
        if add_answer and s.task in POSE_TASKS and s.answer.count(POSE_TOKEN) != 1:
            raise ValueError(f"{where}: a pose task's answer must hold {POSE_TOKEN} exactly once, "
                             f"got {s.answer!r}")
    sizes = sorted({s.image.shape for s in samples if s.image is not None})
    if len(sizes) > 1:
        raise ValueError(f"collate: the images of a batch must share one size, got {sizes}")

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    pose_id = tokenizer.convert_tokens_to_ids(POSE_TOKEN)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompts = [chat_text(s.prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens), None) for s in samples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if add_answer:
        answer_ids = [a + [tokenizer.eos_token_id] for a in
                      tokenizer([" " + s.answer for s in samples], add_special_tokens=False)["input_ids"]]
    else:
        answer_ids = [[] for _ in samples]
    for k, (s, p, a) in enumerate(zip(samples, prompt_ids, answer_ids)):
        want = num_image_tokens if s.image is not None else 0
        if p.count(image_id) != want or (add_answer and s.task in POSE_TASKS and a.count(pose_id) != 1):
            raise ValueError(f"collate: sample {k}: the tokenizer does not encode {IMAGE_TOKEN} and "
                             f"{POSE_TOKEN} as single ids (got {p.count(image_id)} image ids, expected {want})")

    B = len(samples)
    lengths = [len(bos) + len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    T = max(lengths)
    input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)                    # (B, T)
    labels = torch.full((B, T), -100, dtype=torch.long)                       # (B, T)
    pose_token_pos = torch.full((B,), -1, dtype=torch.long)                   # (B,)
    for b, (p, a, L) in enumerate(zip(prompt_ids, answer_ids, lengths)):
        start = T - L if pad_side == "left" else 0
        ids = bos + p + a
        input_ids[b, start:start + L] = torch.tensor(ids)
        attention_mask[b, start:start + L] = 1
        a0 = start + len(bos) + len(p)  # first answer position
        labels[b, a0:a0 + len(a)] = torch.tensor(a, dtype=torch.long)
        if pose_id in a:
            pose_token_pos[b] = a0 + a.index(pose_id)

    J = body.NUM_JOINTS
    pose6d, joints = torch.zeros(B, J, 6), torch.zeros(B, J, 3)  # (B, J, 6), (B, J, 3)
    for b, s in enumerate(samples):
        if s.pose6d is not None:
            pose6d[b] = torch.as_tensor(np.asarray(s.pose6d, dtype=np.float32)).reshape(J, 6)
            if s.joints is not None:
                joints[b] = torch.as_tensor(np.asarray(s.joints, dtype=np.float32)).reshape(J, 3)
    images = [s.image for s in samples if s.image is not None]
    pixel_values = images_to_pixels(np.stack(images)) if images else None  # (M, 3, H, W)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                 pose6d=pose6d, joints=joints, pose_valid=torch.tensor([s.pose6d is not None for s in samples]),
                 pose_token_pos=pose_token_pos, tasks=[s.task for s in samples])


# ---- BOILERPLATE: python data.py ------------------------------------------------------------

def main(argv=None):
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(posebench.BenchConfig, description=__doc__).parse_args_into_dataclasses(args=argv)
    t0 = time.time()
    tok = tiny_tokenizer(cfg)
    print(f"tiny tokenizer: {len(tok)} ids (6 special), {time.time() - t0:.1f} s "
          f"({os.path.join(body.cache_dir(), 'tokenizers', posebench.config_key(cfg))})")
    ds = PoseBenchTasks("train", cfg)
    for task in TASKS:
        s = ds.eval_samples(task)[0]
        batch = collate([s], tok, num_image_tokens=1)
        n_sup = int((batch.labels != -100).sum())
        print(f"\n{task}: {batch.input_ids.shape[1]} tokens at num_image_tokens=1, {n_sup} supervised")
        print("  " + tok.decode(batch.input_ids[0]).replace("\n", " "))


if __name__ == "__main__":
    main()

"""Data: task samples, prompt/answer templates, the built-in benchmark's tasks, the tiny word-level
tokenizer, collate. The paper's real datasets, read from local paths, are in realdata/.

Pose-RFT (§4.1) trains on four kinds of data, turned into single-turn conversations:

| paper source (§4.1)                                     | task here       | built-in (here) / real (realdata/)   |
|---------------------------------------------------------|-----------------|--------------------------------------|
| (1) text-pose: PoseScript                               | `text_to_pose`  | posebench captions / `PoseScript` |
| (2) image-pose: Human3.6M, MPI-INF-3DHP, COCO, MPII;    | `image_to_pose` | posebench renders / `HMR2ImageDataset` |
|     evaluated on 3DPW and Human3.6M                     |                 | (+ realdata.lsp14_* for the protocol) |
| (3) image-text: BEDLAM-Script                           | `vqa` (describe)| - / `BEDLAMScript`          |
| (4) VQA: LLaVA-Instruct-150k                            | `vqa`           | posebench yes/no VQA / `LLaVAInstruct` |

Pose as input (UniPose, PoseLLaVA, PoseFix), built-in only, not in the default mixture:

| task            | input                                 | answer                                          |
|-----------------|---------------------------------------|-------------------------------------------------|
| `pose_to_text`  | "Describe this pose: <pose_input>"    | one of the pose's posebench captions            |
| `pose_edit`     | pose A at <pose_input> + instruction  | POSE_ANSWER, target pose B (posebench.load_edits) |

Abstract prompts (issue 22; CoT-Pose), built-in only, behind a sixth --mix weight (MIX_TASKS):

| task               | input                                     | answer                                           |
|--------------------|-------------------------------------------|--------------------------------------------------|
| `abstract_to_pose` | "Generate the pose of someone kneeling."  | a caption of the target pose (the reasoning),    |
|                    | (posebench.ARCHETYPE_PHRASES, 3 templates) | then POSE_ANSWER; `reasoning=False`: POSE_ANSWER |

Its vocabulary is `vocab.tiny_tokenizer(cfg, abstract=True)`, the pose-input one extended (every id kept).

`<pose_input>` becomes POSE_INPUT_LEN placeholder ids that model.PoseInputEncoder fills; the input
poses travel in `Batch.pose_values`. The tiny preset then speaks `vocab.tiny_tokenizer(cfg, pose_input=True)`,
the default vocabulary with the new token and words appended (every default id unchanged).

`PoseBenchTasks` mixes the built-in benchmark's three tasks into one deterministic `Dataset`;
the real datasets are `Dataset`s of the same `Sample`, mixed by `realdata.Mixture`, so templates,
tokenizer and `collate` serve them unchanged (the 7B preset; docs/REAL_RUNS.md).

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

The pose action p is 24 joints x 6D (Zhou et al. 2019), global orientation first.
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
   text-to-pose targets the canonical one (PoseScript's convention).
5. Real data: see realdata/

Run:
    python data.py                    # build/load the tiny tokenizer, print one encoded sample per task
    python data.py --n_train 2000     # any BenchConfig field is a flag
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

import body
import plumbing
import posebench

# ---- Templates: prompts, the pose answer (§3.3) and the chat format -------------------------

TASKS = ("image_to_pose", "text_to_pose", "vqa")
POSE_TASKS = ("image_to_pose", "text_to_pose")  # tasks whose answer holds <POSE> and whose target is a pose
# Pose as input (UniPose / PoseLLaVA / PoseFix): a pose in the prompt at POSE_INPUT_TOKEN. Not in the
# default mixture; with them the tiny preset speaks an extended vocabulary (`vocab.tiny_tokenizer`).
POSE_INPUT_TASKS = ("pose_to_text", "pose_edit")
ALL_TASKS = TASKS + POSE_INPUT_TASKS
# Abstract prompts (issue 22; CoT-Pose): "Generate the pose of someone kneeling" -> a reasoning (a caption
# of the target pose) then POSE_ANSWER. Not in the default mixture: --mix with 6 weights (MIX_TASKS).
ABSTRACT_TASK = "abstract_to_pose"
MIX_TASKS = ALL_TASKS + (ABSTRACT_TASK,)
POSE_ANSWER_TASKS = POSE_TASKS + ("pose_edit", ABSTRACT_TASK)  # every task whose answer holds <POSE>
IMAGE_TOKEN = "<image>"
POSE_TOKEN = "<POSE>"
POSE_INPUT_TOKEN = "<pose_input>"  # the input pose's placeholder: POSE_INPUT_LEN ids, filled by the pose encoder
POSE_INPUT_LEN = 4  # LM tokens per input pose (model.PoseInputEncoder)
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
    "pose_to_text": [  # answer: a caption of the pose
        "Describe this pose: <pose_input>",
        "<pose_input>\nDescribe the body pose of this person.",
        "How is the body positioned in this pose? <pose_input>",
    ],
    "pose_edit": [  # answer: POSE_ANSWER, the pose after the change
        "<pose_input>\n{instruction} Give the SMPL pose after this change.",
        "Here is a pose: <pose_input> Adjust it as follows: {instruction}",
        "{instruction} Apply this change to the pose <pose_input> and give the new SMPL pose.",
    ],
    "abstract_to_pose": [  # answer: a caption of the target pose, then POSE_ANSWER (abstract_answer)
        "Generate the pose of {phrase}.",
        "What is the SMPL pose of {phrase}?",
        "Show the body pose of {phrase} in SMPL format.",
    ],
}


def abstract_answer(caption: str, reasoning: bool = True) -> str:
    """The abstract-prompt task's answer: the reasoning (a caption of the target pose) and then the pose,
    "{caption} The SMPL pose of this person is <POSE>."; without reasoning (the control), POSE_ANSWER."""
    return f"{caption} {POSE_ANSWER}" if reasoning else POSE_ANSWER


def reasoning_of(answer: str) -> str:
    """The reasoning of a (generated) abstract-prompt answer: its text before the pose sentence ("The SMPL
    pose of this person is"), stripped; the whole text when that sentence is absent."""
    m = re.search(r"The\s+SMPL\s+pose\s+of\s+this\s+person\s+is", answer)
    return (answer[:m.start()] if m else answer).strip()


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
    index: int = -1                  # row of the pose in its split (pose_edit: of B, the target)
    text: str = ""                   # the caption (text_to_pose, pose_to_text) or question (vqa) or instruction
    pose_input: np.ndarray | None = None  # (J, 6) float32 the input pose (pose_to_text, pose_edit: A); the
    #                                  prompt then holds POSE_INPUT_TOKEN once
    source_index: int = -1           # pose_edit: row of A in its split
    archetype: int = -1              # abstract_to_pose: the prompt's archetype (posebench.ARCHETYPE_NAMES)


def pose_aa_to_6d(pose_aa: np.ndarray) -> np.ndarray:
    """(N, J, 3) axis-angle radians -> (N, J, 6) float32 pose actions (first two matrix columns)."""
    aa = torch.as_tensor(np.asarray(pose_aa, dtype=np.float32))
    return body.matrix_to_rot6d(body.axis_angle_to_matrix(aa)).numpy().astype(np.float32)


def view_pose6d(split) -> np.ndarray:
    """Image-to-pose targets of a posebench split: the pose with its root in the camera's view frame,
    as 6D, (N, J, 6)."""
    view = np.concatenate([split.global_orient_view[:, None], split.pose_aa[:, 1:]], 1)  # (N, J, 3)
    return pose_aa_to_6d(view)


def fill_template(template: str, **fields: str) -> str:
    """Fill {name} fields by plain replacement (a caption may hold any character)."""
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


# ---- PoseBench: the built-in benchmark's three tasks ----------------------------------------

FRESH_DRAWS = 2 ** 31  # a dataset length whose indices a training run practically never draws twice


class PoseBenchTasks(torch.utils.data.Dataset):
    """A deterministic mixture of image-to-pose, text-to-pose and VQA samples over one split.

    Sample i draws, from `np.random.default_rng((seed, i))`, in this order: the task (weights
    `mix`), the pose index, the caption or question of that pose, and the prompt paraphrase.
    So sample i depends on (split, cfg, tasks, mix, seed, i) only, not on `length`, the
    worker or the epoch; poses are drawn with replacement.

    Args:
        split: "train", "val" or "test".
        cfg: the benchmark configuration (default: posebench.BenchConfig()).
        tasks: which of ALL_TASKS to draw from (default: the three of TASKS). The pose-input tasks:
            pose_to_text ("Describe this pose: <pose_input>" -> one of the pose's captions) and
            pose_edit (pose A + an instruction -> pose B, posebench.load_edits; the pose drawn is A,
            among the poses that have a B).
        mix: one non-negative weight per entry of `tasks` (normalised to sum 1).
        seed: seed of the mixture (not of the benchmark, which `cfg.seed` fixes).
        reasoning: abstract_to_pose's answers reason before the pose (CoT-Pose; false: the control that
            answers straight with the pose, POSE_ANSWER).
        length: number of samples (default: the number of poses N in the split). Sample i is one fixed
            draw, so indices drawn from range(N) form a fixed pool that reaches about 1 - exp(-w) of
            the poses for a task of weight w (a third at 0.4; docs/RESULTS.md, "Data coverage"); a larger
            length gives more distinct draws.
    """

    def __init__(self, split: str, cfg: posebench.BenchConfig | None = None, tasks: Sequence[str] = TASKS,
                 mix: Sequence[float] = (0.4, 0.4, 0.2), seed: int = 0, length: int | None = None,
                 reasoning: bool = True):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = [t for t in tasks if t not in MIX_TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"PoseBenchTasks: tasks must be distinct names from {MIX_TASKS}, got {tasks}"
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
        self.cfg, self.reasoning = cfg, reasoning
        self._edits = None  # posebench.PoseEdits, loaded on first use (`edits`)
        self.data = posebench.load_split(split, cfg)
        n = len(self.data)
        self.length = n if length is None else int(length)
        # Targets of the whole split, once. Image-to-pose: the root in the camera's view frame.
        self.pose6d_view = view_pose6d(self.data)              # (N, J, 6)
        self.pose6d = pose_aa_to_6d(self.data.pose_aa)        # (N, J, 6) canonical

    def __len__(self) -> int:
        return self.length

    @property
    def edits(self) -> posebench.PoseEdits:
        """The split's editing pairs (posebench.load_edits), loaded once."""
        if self._edits is None:
            self._edits = posebench.load_edits(self.data.name, self.cfg)
            if not len(self._edits):
                raise ValueError(f"PoseBenchTasks: the {self.data.name} split has no editing pair (no pose has a "
                                 "nearby pose of its archetype with 1-4 more posecodes); use a larger split")
        return self._edits

    def __getitem__(self, i: int) -> Sample:
        if not -self.length <= i < self.length:
            raise IndexError(f"PoseBenchTasks: index {i} out of range for length {self.length}")
        i = int(i) % self.length
        rng = np.random.default_rng((self.seed, i))
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.mix))]
        if task == "pose_edit":  # idx: the pair (pose A among those with a B)
            idx = int(rng.integers(len(self.edits)))
            n_texts = len(self.edits.instructions[idx])
        else:
            idx = int(rng.integers(len(self.data)))
            n_texts = {"text_to_pose": len(self.data.captions[idx]), "vqa": len(self.data.vqa[idx]),
                       "pose_to_text": len(self.data.captions[idx]),
                       ABSTRACT_TASK: len(self.data.captions[idx])}.get(task, 1)
        text_choice = int(rng.integers(n_texts))  # caption or question (image_to_pose: none)
        paraphrase = int(rng.integers(len(PROMPTS[task])))
        if task == ABSTRACT_TASK:  # then the archetype's phrase (a draw the other tasks do not make)
            name = posebench.ARCHETYPE_NAMES[self.data.archetype[idx]]
            return self._sample(task, idx, text_choice, paraphrase,
                                int(rng.integers(len(posebench.ARCHETYPE_PHRASES[name]))))
        return self._sample(task, idx, text_choice, paraphrase)

    def eval_samples(self, task: str) -> list[Sample]:
        """One sample per pose of the split for `task` (first caption or question, first paraphrase);
        pose_edit: one per editing pair, in the order of its poses A. abstract_to_pose: one per archetype of
        the split and phrase of it (posebench.ARCHETYPE_PHRASES; 57 prompts when the split holds all 19
        archetypes, CoT-Pose judged 50), its target the archetype's first pose of the split (first caption,
        first paraphrase); metrics judge the pose against all of the archetype's poses."""
        if task not in MIX_TASKS:
            raise ValueError(f"eval_samples: unknown task {task!r}; expected one of {MIX_TASKS}")
        if task == ABSTRACT_TASK:
            out = []
            for a, name in enumerate(posebench.ARCHETYPE_NAMES):
                first = np.flatnonzero(self.data.archetype == a)
                out += [self._sample(task, int(first[0]), 0, 0, k) for k in range(
                    len(posebench.ARCHETYPE_PHRASES[name]))] if len(first) else []
            return out
        n = len(self.edits) if task == "pose_edit" else len(self.data)
        return [self._sample(task, idx, 0, 0) for idx in range(n)]

    def _sample(self, task: str, idx: int, text_choice: int, paraphrase: int, phrase: int = 0) -> Sample:
        template = PROMPTS[task][paraphrase]
        d = self.data
        if task == "image_to_pose":
            return Sample(task, template, POSE_ANSWER, image=np.array(d.images[idx]),
                          pose6d=self.pose6d_view[idx].copy(), joints=d.joints_view[idx].copy(), index=idx)
        if task == "text_to_pose":
            caption = d.captions[idx][text_choice]
            return Sample(task, fill_template(template, caption=caption), POSE_ANSWER,
                          pose6d=self.pose6d[idx].copy(), joints=d.joints[idx].copy(), index=idx, text=caption)
        if task == "pose_to_text":
            caption = d.captions[idx][text_choice]
            return Sample(task, template, caption, pose_input=self.pose6d[idx].copy(), index=idx, text=caption)
        if task == ABSTRACT_TASK:  # the archetype's phrase asks; a caption of pose idx reasons, pose idx answers
            a = int(d.archetype[idx])
            text = posebench.ARCHETYPE_PHRASES[posebench.ARCHETYPE_NAMES[a]][phrase]
            return Sample(task, fill_template(template, phrase=text),
                          abstract_answer(d.captions[idx][text_choice], self.reasoning),
                          pose6d=self.pose6d[idx].copy(), joints=d.joints[idx].copy(), index=idx, text=text,
                          archetype=a)
        if task == "pose_edit":  # idx: the pair
            e = self.edits
            a, b = int(e.source[idx]), int(e.target[idx])
            instruction = e.instructions[idx][text_choice]
            return Sample(task, fill_template(template, instruction=instruction), POSE_ANSWER,
                          pose6d=self.pose6d[b].copy(), joints=d.joints[b].copy(), index=b, text=instruction,
                          pose_input=self.pose6d[a].copy(), source_index=a)
        qa = d.vqa[idx][text_choice]
        return Sample(task, fill_template(template, question=qa["question"]), qa["answer"],
                      image=np.array(d.images[idx]), index=idx, text=qa["question"])


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
    pose_values: torch.Tensor | None = None  # (K, J, 6) float: the input poses of the K samples with one,
    #                                           in batch order (model.PoseInputEncoder fills their placeholders)

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
            add_answer: bool = True, pad_side: str = "right", max_length: int | None = None,
            num_pose_input_tokens: int = POSE_INPUT_LEN) -> Batch:
    """Encode samples as bos + chat_text(prompt, answer) + eos and pad them into a `Batch`.

    IMAGE_TOKEN in a prompt becomes `num_image_tokens` image ids (LLaVA: one placeholder per
    visual token), POSE_INPUT_TOKEN `num_pose_input_tokens` ids, and the input poses go to
    `Batch.pose_values` (None when no sample has one: the batch is then as it was before pose
    input). The answer's ids are those of the whole turn's encoding after the prompt-only
    encoding (add_answer=False, used by generation with pad_side="left"), which must be its
    prefix: the model is trained on the ids it reads and generates. Only the answer ids and the
    eos are supervised. With `max_length`
    (LLaVA-1.5 trains at 2048), a longer sample's answer is cut at that length, as LLaVA cuts it
    (real free-form answers run to hundreds of tokens; posebench's are far shorter).

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
        n_pose_in = s.prompt.count(POSE_INPUT_TOKEN)
        if (s.pose_input is not None) != (n_pose_in == 1) or n_pose_in > 1:
            raise ValueError(f"{where}: {'has' if s.pose_input is not None else 'has no'} input pose but its prompt "
                             f"holds {n_pose_in} {POSE_INPUT_TOKEN} (expected {int(s.pose_input is not None)}): "
                             f"{s.prompt!r}")
        if add_answer and s.task in POSE_ANSWER_TASKS and s.answer.count(POSE_TOKEN) != 1:
            raise ValueError(f"{where}: a pose task's answer must hold {POSE_TOKEN} exactly once, "
                             f"got {s.answer!r}")
    sizes = sorted({s.image.shape for s in samples if s.image is not None})
    if len(sizes) > 1:
        raise ValueError(f"collate: the images of a batch must share one size, got {sizes}")

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    pose_id = tokenizer.convert_tokens_to_ids(POSE_TOKEN)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    pose_input_id = tokenizer.convert_tokens_to_ids(POSE_INPUT_TOKEN) if any(
        s.pose_input is not None for s in samples) else None
    if pose_input_id in (None, tokenizer.unk_token_id) and any(s.pose_input is not None for s in samples):
        raise ValueError(f"collate: the tokenizer has no {POSE_INPUT_TOKEN} token; the pose-input tasks need "
                         "vocab.tiny_tokenizer(cfg, pose_input=True) (train_sft.py: --mix with 5 weights)")
    prompts = [s.prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
               .replace(POSE_INPUT_TOKEN, POSE_INPUT_TOKEN * num_pose_input_tokens) for s in samples]
    prompt_ids = tokenizer([chat_text(p, None) for p in prompts], add_special_tokens=False)["input_ids"]
    answer_ids = [[] for _ in samples]
    if add_answer:  # the answer's ids as the whole turn encodes them: " " + answer alone would differ for
        # LLaMA's tokenizer (its normaliser prepends "▁" to a text, so a leading space becomes a "▁" token)
        whole = tokenizer([chat_text(p, s.answer) for p, s in zip(prompts, samples)], add_special_tokens=False)
        for k, (p, w) in enumerate(zip(prompt_ids, whole["input_ids"])):
            if w[:len(p)] != p:
                raise ValueError(f"collate: sample {k} ({samples[k].task}, {samples[k].index}): the tokenizer "
                                 "encodes the prompt differently when the answer follows it (a token across "
                                 "'ASSISTANT:' and the answer), so the ids generation starts from would not be "
                                 "those trained on; use a tokenizer whose tokens stop at spaces (LLaMA's do)")
            answer_ids[k] = w[len(p):] + [tokenizer.eos_token_id]
    if max_length is not None:
        for k, (s, p) in enumerate(zip(samples, prompt_ids)):
            room = max_length - len(bos) - len(p)
            if room < (1 if add_answer else 0):
                raise ValueError(f"collate: sample {k} ({s.task}, {s.index}): its prompt takes {len(bos) + len(p)} "
                                 f"tokens, leaving no room for an answer within max_length {max_length}")
            if add_answer and s.task in POSE_ANSWER_TASKS and pose_id not in answer_ids[k][:room]:
                raise ValueError(f"collate: sample {k} ({s.task}, {s.index}): max_length {max_length} cuts its "
                                 f"answer before {POSE_TOKEN}")
            answer_ids[k] = answer_ids[k][:room]
    for k, (s, p, a) in enumerate(zip(samples, prompt_ids, answer_ids)):
        want = num_image_tokens if s.image is not None else 0
        if s.pose_input is not None and p.count(pose_input_id) != num_pose_input_tokens:
            raise ValueError(f"collate: sample {k}: the tokenizer does not encode {POSE_INPUT_TOKEN} as a single id")
        if p.count(image_id) != want or (add_answer and s.task in POSE_ANSWER_TASKS and a.count(pose_id) != 1):
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
    inputs = [torch.as_tensor(np.asarray(s.pose_input, dtype=np.float32)).reshape(J, 6)
              for s in samples if s.pose_input is not None]
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                 pose6d=pose6d, joints=joints, pose_valid=torch.tensor([s.pose6d is not None for s in samples]),
                 pose_token_pos=pose_token_pos, tasks=[s.task for s in samples],
                 pose_values=torch.stack(inputs) if inputs else None)


def clean_answer(text: str, tokenizer) -> str:
    """A decoded completion cut at the first eos / pad token, stripped."""
    for t in (tokenizer.eos_token, tokenizer.pad_token):
        text = text.split(t)[0] if t and t in text else text
    return text.strip()


def trains_abstract(mix) -> bool:
    """abstract_to_pose is in the mixture with a positive weight (--mix with 6 weights, the last > 0)."""
    return len(mix) == len(MIX_TASKS) and mix[-1] > 0


def mix_tasks(mix) -> tuple:
    """The posebench tasks a --mix of weights covers: TASKS for 3 weights, ALL_TASKS (the pose-input
    tasks too) for 5, MIX_TASKS (abstract_to_pose too) for 6."""
    return {len(ALL_TASKS): ALL_TASKS, len(MIX_TASKS): MIX_TASKS}.get(len(mix), TASKS)


# ---- BOILERPLATE: python data.py ------------------------------------------------------------

def main(argv=None):
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(posebench.BenchConfig, description=__doc__).parse_args_into_dataclasses(args=argv)
    t0 = time.time()
    import vocab

    tok = vocab.tiny_tokenizer(cfg)
    print(f"tiny tokenizer: {len(tok)} ids (6 special), {time.time() - t0:.1f} s "
          f"({os.path.join(plumbing.cache_dir(), 'tokenizers', posebench.config_key(cfg))})")
    ds = PoseBenchTasks("train", cfg)
    for task in TASKS:
        s = ds.eval_samples(task)[0]
        batch = collate([s], tok, num_image_tokens=1)
        n_sup = int((batch.labels != -100).sum())
        print(f"\n{task}: {batch.input_ids.shape[1]} tokens at num_image_tokens=1, {n_sup} supervised")
        print("  " + tok.decode(batch.input_ids[0]).replace("\n", " "))


if __name__ == "__main__":
    main()

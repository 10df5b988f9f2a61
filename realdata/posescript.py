"""PoseScript (+ AMASS): text-to-pose pairs, the poses brought into the one text-to-pose frame."""
from __future__ import annotations

import collections
import os
import zipfile
from typing import Sequence

import numpy as np
import torch

import body
from data import fill_template, pose_aa_to_6d, POSE_ANSWER, PROMPTS, Sample
from realdata.common import (AMASS_SOURCE, _checked_captions, DataFormatError, _load_npz, _need, npz_headers,
                             POSESCRIPT_SOURCE, _read_json, _warn_cut, _where)


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
    return body.matrix_to_axis_angle(torch.as_tensor(yaw_normalizer(R) @ R)).numpy()


def yaw_normalizer(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) root rotations in AMASS's z-up world -> (N, 3, 3) the rotation about the vertical axis that
    PoseScript's normalisation applies to each, Rz(-tz) with tz = atan2(R[1, 0], R[0, 0])."""
    return _rotz(-np.arctan2(R[:, 1, 0], R[:, 0, 0]))


def smplh_to_smpl24(poses: np.ndarray) -> np.ndarray:
    """(N, 156) SMPL+H axis-angle (global orientation, 21 body joints, 30 hand joints) -> (N, 24, 3):
    the first 22 joints, and identity for SMPL's two hand joints (22, 23), which SMPL+H replaces by
    MANO's fingers."""
    out = np.zeros((len(poses), body.NUM_JOINTS, 3), dtype=np.float64)
    out[:, :22] = np.asarray(poses, dtype=np.float64)[:, :66].reshape(-1, 22, 3)
    return out


_Y_UP = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # Rx(-pi/2): AMASS's z-up world -> SMPL's y-up


def text_pose_frame(global_orient_zup: np.ndarray, turn_like: np.ndarray | None = None) -> np.ndarray:
    """The text-to-pose frame of every path (policy targets, retrievers, rewards, metrics): a root
    orientation in AMASS's z-up world, PoseScript-normalised (`posescript_normalize`), then written
    in SMPL's y-up world (x left, y up, z forward), posebench's frame. (N, 3) -> (N, 3) axis-angle.

    A body turned about the vertical axis gives the same result. posebench's poses (zero yaw by
    construction: the forward axis in the y-z plane) are in it when their root has no roll, and
    nearly so upright (median 0.4 deg about the vertical); PoseScript's rule fixes the body's
    left-right axis instead, so lying bodies differ (on the back or front by a median 8-9 deg, on the
    side, where that axis is vertical and the rule ill-defined, by 90).

    `turn_like` (N, 3): turn each root by the normalising rotation of this other root instead of its own
    (PoseFix's in-sequence pairs: B turned as A was, so that the turn between them is kept)."""
    to_matrix = lambda aa: body.axis_angle_to_matrix(  # noqa: E731
        torch.as_tensor(np.asarray(aa, dtype=np.float64))).numpy()
    R = to_matrix(global_orient_zup)
    turn = yaw_normalizer(R if turn_like is None else to_matrix(turn_like))
    return body.matrix_to_axis_angle(torch.as_tensor(_Y_UP @ turn @ R)).numpy()


def id_texts(dataset: str, paths: list, source: str, key: str, text: str) -> dict:
    """{id: [texts]} from JSON files of {"<id>": text or [texts]} (PoseScript's captions, PoseFix's modifiers),
    the files' texts of one id joined in order; DataFormatError naming the file and the record, a text
    longer than MAX_CAPTION_CHARS cut with a warning. key, text: what the ids and the texts are (for errors)."""
    texts: dict[int, list[str]] = {}
    for path in paths:
        schema = f'{{"<{key}>": {text} or [{text}s]}}'
        found, cut = _read_json(dataset, path, source, schema), []
        if not isinstance(found, dict):
            raise DataFormatError(f"{_where(dataset, path)}: holds a {type(found).__name__}; expected {schema}")
        for k, val in found.items():
            vals = val if isinstance(val, list) else [val]
            if not k.lstrip("-").isdigit() or not all(isinstance(v, str) for v in vals):
                raise DataFormatError(f"{_where(dataset, path, k)}: expected an integer {key} mapped to a {text} or "
                                      f"a list of {text}s, got {type(val).__name__}")
            texts.setdefault(int(k), []).extend(_checked_captions(dataset, path, k, vals, cut))
        _warn_cut(dataset, path, cut)
    return texts


def pose_ref(dataset: str, info: dict, ids_path: str, pid: int, named_in: str) -> tuple:
    """(sequence npz path, frame) of pose `pid` from PoseScript's ids file (`info`, read from `ids_path`), checked:
    DataFormatError naming the file and the record, and `named_in`, the file that asked for the pose."""
    ref = info.get(str(pid))
    if ref is None:
        raise DataFormatError(f"{_where(dataset, ids_path, str(pid))}: pose id of {named_in} missing")
    if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[1], str) and isinstance(ref[2], int)):
        raise DataFormatError(f"{_where(dataset, ids_path, str(pid))}: got {ref!r}; expected "
                              '["AMASS", "<sequence npz path>", frame index]')
    if ref[0] != "AMASS":
        raise DataFormatError(f"{_where(dataset, ids_path, str(pid))}: dataset {ref[0]!r} unknown; "
                              "PoseScript's poses come from 'AMASS'")
    return ref[1], ref[2]


class AmassFrames:
    """Single frames of AMASS sequences (SMPL+H G npz, 'poses' (T, 156)), as SMPL's 24 joints in axis-angle with
    the root still in AMASS's z-up world; each sequence decoded once (a small cache). Shared by the datasets
    built on PoseScript's pose ids (PoseScript, PoseFix)."""

    def __init__(self, dataset: str, root: str, cache: int = 64):
        self.dataset, self.root, self.cache = dataset, root, cache
        self._sequences = collections.OrderedDict()

    def preflight(self, asked: list) -> list:
        """Problems of the sequences that `asked` [(pose id, sequence npz, frame)] names, from the npz headers
        alone: every file exists, holds 'poses' (T, 156) of numbers, and T covers every frame asked of it."""
        frames = collections.defaultdict(list)  # sequence -> [(pose id, frame)]
        for pid, rel, frame in asked:
            frames[rel].append((pid, frame))
        problems = []
        for rel, want in frames.items():
            path = os.path.join(self.root, rel)
            where = _where(self.dataset, path, want[0][0])
            if not os.path.isfile(path):
                problems.append(f"{where}: AMASS sequence not found ({len(want)} pose(s) of the split name it); pass "
                                f"the AMASS directory holding it ({AMASS_SOURCE})")
                continue
            try:
                shape, dtype = npz_headers(path).get("poses", (None, None))
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                problems.append(f"{where}: not a readable npz ({type(err).__name__}: {err}); download it again "
                                f"({AMASS_SOURCE})")
                continue
            if shape is None or len(shape) != 2 or shape[1] != 156 or dtype.kind != "f":
                problems.append(f"{where}: 'poses' is {'missing' if shape is None else f'{shape} {dtype}'}; expected "
                                f"floats (T, 156), SMPL+H's 52 joints x 3 (AMASS's SMPL+H G format, {AMASS_SOURCE})")
                continue
            bad = [(pid, f) for pid, f in want if not 0 <= f < shape[0]]
            if bad:
                problems.append(f"{_where(self.dataset, path, bad[0][0])}: frame {bad[0][1]} out of range for "
                                f"{shape[0]} frames ({len(bad)} pose(s)); the release and the AMASS files are of "
                                "different versions")
        return problems

    def frame(self, rel: str, frame: int, pid) -> np.ndarray:
        """(24, 3) axis-angle, radians, of frame `frame` of sequence `rel` (pose id `pid`, named in errors)."""
        path = os.path.join(self.root, rel)
        poses = self._sequences.get(path)
        if poses is None:
            with _load_npz(self.dataset, path, f"AMASS sequence of pose {pid}", AMASS_SOURCE) as z:
                if "poses" not in z.files:
                    raise DataFormatError(f"{_where(self.dataset, path)}: no 'poses' array (keys {z.files}); expected "
                                          "an AMASS SMPL+H G npz with 'poses' (T, 156)")
                poses = z["poses"]
            if poses.ndim != 2 or poses.shape[1] != 156:
                raise DataFormatError(f"{_where(self.dataset, path)}: 'poses' has shape {poses.shape}; expected "
                                      "(T, 156), SMPL+H's 52 joints x 3 (the SMPL+H G format)")
            self._sequences[path] = poses
            if len(self._sequences) > self.cache:
                self._sequences.popitem(last=False)
        if not 0 <= frame < len(poses):
            raise DataFormatError(f"{_where(self.dataset, path, pid)}: frame {frame} out of range for "
                                  f"{len(poses)} frames")
        return smplh_to_smpl24(poses[frame][None])[0]


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
    """text_to_pose samples from PoseScript (Delmas et al. 2022) on AMASS poses (§4.1 (1)), or pose_to_text
    ones (`task`: UniPose's pose comprehension, the pose as input and a caption as the answer).

    Files, as naver/posescript's text2pose/config.py and data.py read them:
        root/ids_2_dataset_sequence_and_frame_index_100k.json  {"<pose id>": ["AMASS", "<sequence npz>", frame]}
        root/{split}_ids_100k.json                             [pose id, ...]
        root/posescript_human_6293.json, posescript_auto_100k.json  {"<pose id>": caption or [captions]}
        amass_root/<sequence npz>                               'poses' (T, 156): SMPL+H axis-angle, radians
    A pose of the split counts if one of the chosen caption files describes it ("human" alone is
    PoseScript-H2, the paper's text-to-pose test set). The target is SMPL's 24 joints (hands at
    identity) in the one text-to-pose frame of this project (`text_pose_frame`): the global
    orientation normalised about the vertical axis as PoseScript does (`posescript_normalize`),
    then turned from AMASS's z-up world into SMPL's y-up one, posebench's: an upright body faces
    +z with the identity root. The policy, the retrievers, the rewards and the metrics see it so.

    Args:
        root: the PoseScript release directory. amass_root: AMASS's SMPL+H G directory.
        split: train, val or test. captions: "human", "auto" or both.
        bodymodel: a body.BodyModel to fill `joints` (None: joints stay None).
        seed: seed of the caption and prompt draws (sample i depends on (seed, i) only).
        task: text_to_pose or pose_to_text.
    """

    NAME = "PoseScript"
    CAPTION_FILES = {"human": "posescript_human_6293.json", "auto": "posescript_auto_100k.json"}
    IDS_FILE = "ids_2_dataset_sequence_and_frame_index_100k.json"

    def __init__(self, root: str, amass_root: str, split: str = "train", captions: Sequence[str] = ("human", "auto"),
                 bodymodel=None, seed: int = 0, task: str = "text_to_pose"):
        if split not in ("train", "val", "test"):
            raise ValueError(f"{self.NAME}: split must be train, val or test, got {split!r}")
        if task not in ("text_to_pose", "pose_to_text"):
            raise ValueError(f"{self.NAME}: task must be text_to_pose or pose_to_text, got {task!r}")
        self.task = task
        bad = [c for c in captions if c not in self.CAPTION_FILES]
        if bad or not captions:
            raise ValueError(f"{self.NAME}: captions must be among {tuple(self.CAPTION_FILES)}, got {tuple(captions)}")
        _need(self.NAME, root, "release directory", POSESCRIPT_SOURCE)
        self.amass = AmassFrames(self.NAME, _need(self.NAME, amass_root, "AMASS directory", AMASS_SOURCE))
        self.bodymodel, self.seed = bodymodel, seed
        ids_path = os.path.join(root, self.IDS_FILE)
        info = _read_json(self.NAME, ids_path, POSESCRIPT_SOURCE, '{"<pose id>": ["AMASS", "<npz path>", frame]}')
        split_path = os.path.join(root, f"{split}_ids_100k.json")
        split_ids = _read_json(self.NAME, split_path, POSESCRIPT_SOURCE, "a list of pose ids")
        if not isinstance(info, dict) or not isinstance(split_ids, list):
            raise DataFormatError(f"{self.NAME}: {ids_path} must hold a dict and {split_path} a list")
        texts = id_texts(self.NAME, [os.path.join(root, self.CAPTION_FILES[c]) for c in captions], POSESCRIPT_SOURCE,
                         "pose id", "caption")
        self.ids, self.captions, self.refs = [], [], []
        for pid in split_ids:
            if not isinstance(pid, int):
                raise DataFormatError(f"{_where(self.NAME, split_path, pid)}: pose ids must be integers")
            if not texts.get(pid):
                continue
            self.ids.append(pid)
            self.captions.append(texts[pid])
            self.refs.append(pose_ref(self.NAME, info, ids_path, pid, split_path))
        if not self.ids:
            raise DataFormatError(f"{self.NAME}: no pose of {split_path} has a caption in {list(captions)}")

    def __len__(self) -> int:
        return len(self.ids)

    def preflight(self) -> list:
        """Problems of the AMASS sequences the poses name, from the npz headers alone (`AmassFrames.preflight`)."""
        return self.amass.preflight([(pid, rel, frame) for pid, (rel, frame) in zip(self.ids, self.refs)])

    def pose_aa(self, i: int) -> np.ndarray:
        """The target of pose i: (24, 3) axis-angle, radians, orientation normalised."""
        rel, frame = self.refs[i]
        aa = self.amass.frame(rel, frame, self.ids[i])  # (24, 3)
        aa[0] = text_pose_frame(aa[:1])[0]
        return aa

    def all_pose_aa(self) -> np.ndarray:
        """Every pose's target, (N, 24, 3) as `pose_aa`, each AMASS sequence read once (retrieval.py)."""
        out = np.zeros((len(self), body.NUM_JOINTS, 3))
        for i in sorted(range(len(self)), key=lambda i: self.refs[i][0]):
            out[i] = self.pose_aa(i)
        return out

    def __getitem__(self, i: int) -> Sample:
        return self.draw(int(i), np.random.default_rng((self.seed, int(i))))

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Pose i with a caption and a prompt paraphrase drawn from rng (`Mixture` passes its own per draw)."""
        caption = int(rng.integers(len(self.captions[i])))
        return self.sample(int(i), caption, int(rng.integers(len(PROMPTS[self.task]))))

    def sample(self, i: int, caption: int = 0, paraphrase: int = 0) -> Sample:
        """Pose i with its caption `caption`, in prompt paraphrase `paraphrase`: text_to_pose (the caption asks,
        the pose answers) or pose_to_text (the pose at data.POSE_INPUT_TOKEN asks, the caption answers)."""
        text = self.captions[i][caption]
        if self.task == "pose_to_text":
            pose6d, _ = _targets(self.pose_aa(i)[None])
            return Sample("pose_to_text", PROMPTS["pose_to_text"][paraphrase], text, pose_input=pose6d[0], index=i,
                          text=text)
        pose6d, joints = _targets(self.pose_aa(i)[None], self.bodymodel)
        return Sample("text_to_pose", fill_template(PROMPTS["text_to_pose"][paraphrase], caption=text), POSE_ANSWER,
                      pose6d=pose6d[0], joints=None if joints is None else joints[0], index=i, text=text)

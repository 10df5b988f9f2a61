"""The paper's real datasets (§4.1), read from local paths: PoseScript (+ AMASS), HMR2.0-style image
npz (3DPW, Human3.6M, COCO, MPII, ...), BEDLAM-Script, LLaVA-Instruct, and `Mixture`, which mixes
them for the 7B preset (docs/REAL_RUNS.md).

Each dataset yields data.py's `Sample`s, so templates, tokenizer and `collate` serve them unchanged.
Images become one square person crop at the CLIP tower's size (`image_size`, 336 for LLaVA-1.5);
the pose ViT takes its own 3:4 centre crop of it (posevit.crop_to_aspect), which is HMR2.0's input
window. Every format problem raises `DataFormatError`, naming the dataset, the file, the record
and the schema; a missing file names where to get it.

Departures from the paper's data: SMPL+H / SMPL-X body joints are taken as SMPL's first 21,
SMPL's two hand joints at identity; BEDLAM-Script serves as image -> description pairs (the
paper does not say how it is used); LLaVA-Instruct's multi-turn conversations become
single-turn samples.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import pickle
import re
import zipfile
from typing import Sequence

import numpy as np
import torch

import body
import data
import metrics
import model as M
import posevit
import presets
from data import IMAGE_TOKEN, POSE_ANSWER, PROMPTS, Sample, fill_template, pose_aa_to_6d


POSESCRIPT_SOURCE = ("the PoseScript V2 release, https://download.europe.naverlabs.com/ComputerVision/PoseScript/"
                     "posescript_release_v2.zip (see github.com/naver/posescript)")
AMASS_SOURCE = "AMASS in the SMPL+H G format, https://amass.is.tue.mpg.de (PoseScript uses its 19 sub-datasets)"
HMR2_DATA_SOURCE = ("4D-Humans' hmr2_evaluation_data.tar.gz (its README, 'Evaluation': 3dpw_test.npz, h36m_val_p2.npz, "
                    "...), or training npz files with SMPL poses in that schema or SPIN's (github.com/nkolot/SPIN, "
                    "datasets/preprocess: only its mpi_inf_3dhp_train.npz has poses; 4D-Humans ships its training "
                    "sets as webdataset tars, which are not read here), with each dataset's own images")
BEDLAM_SCRIPT_SOURCE = ("PoseEmbroider's BEDLAM processing (github.com/naver/poseembroider, datasets/process_bedlam/"
                        "do.sh) run on BEDLAM (https://bedlam.is.tue.mpg.de)")
LLAVA_INSTRUCT_SOURCE = ("llava_instruct_150k.json from the Hugging Face dataset liuhaotian/LLaVA-Instruct-150K, "
                         "with COCO train2017 images (https://cocodataset.org)")
DESCRIBE_PROMPT = "<image>\nDescribe the body pose of the person in this image."


# A longer caption is cut to this many characters, with a warning (PoseScript's run to a few hundred): a prompt
# past the language model's positions (4096 for LLaVA-1.5) would otherwise run on with no word.
MAX_CAPTION_CHARS = 2000


class DataFormatError(ValueError):
    """A dataset file that does not follow its schema."""


def _load_npz(dataset: str, path: str, what: str, source: str):
    """np.load of an npz (no pickles), DataFormatError naming the file if it is not one (truncated, corrupt)."""
    _need(dataset, path, what, source)
    problem = "not a zip archive"
    if zipfile.is_zipfile(path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            problem = f"{type(err).__name__}: {err}"
    raise DataFormatError(f"{_where(dataset, path)}: not a readable npz ({problem}); the file is truncated, corrupt or "
                          f"of another format: download it again ({source})")


def _checked_captions(dataset: str, path: str, key, vals: list, cut: list) -> list:
    """A record's captions: DataFormatError for an empty one; one longer than MAX_CAPTION_CHARS is cut to it
    and its length appended to `cut` (the caller warns once per file)."""
    if not all(v.strip() for v in vals):
        raise DataFormatError(f"{_where(dataset, path, key)}: an empty caption; give the record text or remove it")
    cut += [len(v) for v in vals if len(v) > MAX_CAPTION_CHARS]
    return [v[:MAX_CAPTION_CHARS] for v in vals]


def fit_captions(dataset, tokenizer, max_tokens: int) -> None:
    """Cut every caption of `dataset` (its `captions`, a list of lists: PoseScript, as evaluate.py reads it) to
    at most `max_tokens` tokens of `tokenizer`, in place, warning how many were cut and the longest: a prompt
    past the language model's positions would run on with no word."""
    cut = []
    for caps in dataset.captions:
        for k, text in enumerate(caps):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) > max_tokens:
                cut.append(len(enc["input_ids"]))
                caps[k] = text[:enc["offset_mapping"][max_tokens - 1][1]]
    if cut:
        print(f"warning: {getattr(dataset, 'NAME', 'dataset')}: {len(cut)} caption(s) longer than {max_tokens} tokens "
              f"(the longest {max(cut)}) cut to {max_tokens}, so that the prompts fit the language model's positions")


def _warn_cut(dataset: str, path: str, cut: list) -> None:
    if cut:
        print(f"warning: {dataset}: {path}: {len(cut)} caption(s) longer than {MAX_CAPTION_CHARS} characters cut to "
              f"{MAX_CAPTION_CHARS} (the longest had {max(cut)}; MAX_CAPTION_CHARS)")


def _where(dataset: str, path, record=None) -> str:
    return f"{dataset}: {path}" + ("" if record is None else f", record {record!r}")


def _need(dataset: str, path: str, what: str, source: str) -> str:
    """`path` if it exists, else FileNotFoundError naming the dataset, the file and its source."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: {what} {path} not found; it comes from {source}")
    return path


# The preflight (`preflight` of each dataset, preflight_real) checks the files of this many records
# per dataset, spread over them: a wrong image directory or a partial download shows in any sample.
IMAGE_SAMPLE = 64


def _spread(n: int, k: int = IMAGE_SAMPLE) -> list:
    """At most k indices spread evenly over range(n), first and last included."""
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))}) if n else []


def _missing_images(dataset: str, img_dir: str, records, source: str) -> list:
    """Problems for the images of `records` ((record, relative path) pairs) that are not files in img_dir."""
    gone = [(r, rel) for r, rel in records if not os.path.isfile(os.path.join(img_dir, rel))]
    if not gone:
        return []
    r, rel = gone[0]
    return [f"{_where(dataset, os.path.join(img_dir, rel), r)}: image not found ({len(gone)} of the {len(records)} "
            f"records checked name a missing image); pass the directory that holds them, as each record names it "
            f"(the images come from {source})"]


def npz_headers(path: str) -> dict:
    """{array name: (shape, dtype)} of an npz read from its .npy headers alone (no array is loaded).
    OSError / ValueError / zipfile.BadZipFile for a file that is not one."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                out[name[:-4]] = (shape, dtype)
    return out


def _read_json(dataset: str, path: str, source: str, schema: str):

    _need(dataset, path, "file", source)
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as err:
        raise DataFormatError(f"{_where(dataset, path)}: not valid JSON ({err}); expected {schema}; a truncated or "
                              f"damaged file: download it again ({source})") from None


def _read_pickle(dataset: str, path: str, source: str):
    """A pickle of numpy arrays and builtins, read without importing anything else it names."""

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
        try:
            return Restricted(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError, TypeError, AttributeError) as err:
            if isinstance(err, DataFormatError):
                raise
            raise DataFormatError(f"{_where(dataset, path)}: not a readable pickle ({type(err).__name__}: {err}); the "
                                  f"file is truncated or corrupt: make or download it again ({source})") from None


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


def text_pose_frame(global_orient_zup: np.ndarray) -> np.ndarray:
    """The text-to-pose frame of every path (policy targets, retrievers, rewards, metrics): a root
    orientation in AMASS's z-up world, PoseScript-normalised (`posescript_normalize`), then written
    in SMPL's y-up world (x left, y up, z forward), posebench's frame. (N, 3) -> (N, 3) axis-angle.

    A body turned about the vertical axis gives the same result. posebench's poses (zero yaw by
    construction: the forward axis in the y-z plane) are in it when their root has no roll, and
    nearly so upright (median 0.4 deg about the vertical); PoseScript's rule fixes the body's
    left-right axis instead, so lying bodies differ (on the back or front by a median 8-9 deg, on the
    side, where that axis is vertical and the rule ill-defined, by 90)."""
    R = body.axis_angle_to_matrix(torch.as_tensor(posescript_normalize(global_orient_zup))).numpy()
    return body.matrix_to_axis_angle(torch.as_tensor(_Y_UP @ R)).numpy()


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
    identity) in the one text-to-pose frame of this project (`text_pose_frame`): the global
    orientation normalised about the vertical axis as PoseScript does (`posescript_normalize`),
    then turned from AMASS's z-up world into SMPL's y-up one, posebench's: an upright body faces
    +z with the identity root. The policy, the retrievers, the rewards and the metrics see it so.

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
                 bodymodel=None, seed: int = 0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"{self.NAME}: split must be train, val or test, got {split!r}")
        bad = [c for c in captions if c not in self.CAPTION_FILES]
        if bad or not captions:
            raise ValueError(f"{self.NAME}: captions must be among {tuple(self.CAPTION_FILES)}, got {tuple(captions)}")
        _need(self.NAME, root, "release directory", POSESCRIPT_SOURCE)
        self.amass_root = _need(self.NAME, amass_root, "AMASS directory", AMASS_SOURCE)
        self.bodymodel, self.seed = bodymodel, seed
        ids_path = os.path.join(root, self.IDS_FILE)
        info = _read_json(self.NAME, ids_path, POSESCRIPT_SOURCE, '{"<pose id>": ["AMASS", "<npz path>", frame]}')
        split_path = os.path.join(root, f"{split}_ids_100k.json")
        split_ids = _read_json(self.NAME, split_path, POSESCRIPT_SOURCE, "a list of pose ids")
        if not isinstance(info, dict) or not isinstance(split_ids, list):
            raise DataFormatError(f"{self.NAME}: {ids_path} must hold a dict and {split_path} a list")
        texts: dict[int, list[str]] = {}
        for c in captions:
            path = os.path.join(root, self.CAPTION_FILES[c])
            schema = '{"<pose id>": caption or [captions]}'
            found, cut = _read_json(self.NAME, path, POSESCRIPT_SOURCE, schema), []
            if not isinstance(found, dict):
                raise DataFormatError(f"{_where(self.NAME, path)}: holds a {type(found).__name__}; expected {schema}")
            for key, val in found.items():
                vals = val if isinstance(val, list) else [val]
                if not key.lstrip("-").isdigit() or not all(isinstance(v, str) for v in vals):
                    raise DataFormatError(f"{_where(self.NAME, path, key)}: expected an integer pose id mapped to "
                                          f"a caption or a list of captions, got {type(val).__name__}")
                texts.setdefault(int(key), []).extend(_checked_captions(self.NAME, path, key, vals, cut))
            _warn_cut(self.NAME, path, cut)
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

    def preflight(self) -> list:
        """Problems of the AMASS sequences the poses name, from the npz headers alone: every file
        exists, holds 'poses' (T, 156) of numbers, and T covers every frame asked of it."""
        frames = collections.defaultdict(list)  # sequence -> [(pose id, frame)]
        for pid, (rel, frame) in zip(self.ids, self.refs):
            frames[rel].append((pid, frame))
        problems = []
        for rel, asked in frames.items():
            path = os.path.join(self.amass_root, rel)
            where = _where(self.NAME, path, asked[0][0])
            if not os.path.isfile(path):
                problems.append(f"{where}: AMASS sequence not found ({len(asked)} pose(s) of the split name it); pass "
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
            bad = [(pid, f) for pid, f in asked if not 0 <= f < shape[0]]
            if bad:
                problems.append(f"{_where(self.NAME, path, bad[0][0])}: frame {bad[0][1]} out of range for {shape[0]} "
                                f"frames ({len(bad)} pose(s)); the release and the AMASS files are of different versions")
        return problems

    def pose_aa(self, i: int) -> np.ndarray:
        """The target of pose i: (24, 3) axis-angle, radians, orientation normalised."""
        rel, frame = self.refs[i]
        path = os.path.join(self.amass_root, rel)
        poses = self._sequences.get(path)
        if poses is None:
            with _load_npz(self.NAME, path, f"AMASS sequence of pose {self.ids[i]}", AMASS_SOURCE) as z:
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
        return self.sample(int(i), int(rng.integers(len(self.captions[i]))), int(rng.integers(len(PROMPTS["text_to_pose"]))))

    def sample(self, i: int, caption: int = 0, paraphrase: int = 0) -> Sample:
        """Pose i with its caption `caption`, in prompt paraphrase `paraphrase`."""
        pose6d, joints = _targets(self.pose_aa(i)[None], self.bodymodel)
        text = self.captions[i][caption]
        return Sample("text_to_pose", fill_template(PROMPTS["text_to_pose"][paraphrase], caption=text), POSE_ANSWER,
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
    same fields. Other keys are ignored.

    Training (require_pose=True) needs body_pose and has_body_pose and serves only the records with a
    pose (has_body_pose 0: 2D-only COCO/MPII annotations are skipped). Evaluation (require_pose=False,
    as evaluate.py reads 3DPW / H36M) follows HMR2.0's protocol: every record is served, its target is
    the 3D keypoints (`gt_lsp14`), and body_pose is optional (4D-Humans' loader treats it so too); a
    record's pose6d / joints are filled only where it has a pose.

    Args:
        name: the dataset's name in messages ("3DPW", "H36M", ...). npz_path, img_dir: its files.
        image_size: side of the square crop (the CLIP tower's input, 336 for LLaVA-1.5).
        bodymodel: a body.BodyModel to fill `joints` from pose and betas (None: joints stay None).
        require_pose: True to train on the poses, False to evaluate every record (see above).
    """

    SCHEMA = ("imgname (N,), center (N, 2), scale (N,) or (N, 2), body_pose (N, 72), has_body_pose (N,) "
              "[+ optional betas (N, 10), has_betas (N,), body_keypoints_2d (N, 25, 3), extra_keypoints_2d "
              "(N, 19, 3), body_keypoints_3d (N, 25, 4), extra_keypoints_3d (N, 19, 4)]")
    SHAPES = {"center": (2,), "body_pose": (72,), "has_body_pose": (), "betas": (10,), "has_betas": (),
              "body_keypoints_2d": (25, 3), "extra_keypoints_2d": (19, 3), "body_keypoints_3d": (25, 4),
              "extra_keypoints_3d": (19, 4)}

    def __init__(self, name: str, npz_path: str, img_dir: str, image_size: int = 336, bodymodel=None,
                 scale_in_200px: bool = False, seed: int = 0, require_pose: bool = True):
        self.name, self.npz_path, self.image_size, self.bodymodel, self.seed = name, npz_path, image_size, bodymodel, seed
        _need(name, npz_path, "annotation file", HMR2_DATA_SOURCE)
        self.img_dir = _need(name, img_dir, "image directory", HMR2_DATA_SOURCE)
        with _load_npz(name, npz_path, "annotation file", HMR2_DATA_SOURCE) as z:
            keys = set(z.files)
            spin = "body_pose" not in keys and "pose" in keys  # SPIN's names for the same fields
            alias = {"body_pose": "pose", "has_body_pose": "has_smpl", "betas": "shape", "has_betas": "has_smpl"} \
                if spin else {}
            keys |= {k for k, v in alias.items() if v in keys}
            if spin and "has_smpl" not in z.files:  # SPIN's loader: a file without has_smpl has a pose in every record
                keys |= {"has_body_pose"}
            needed = ("imgname", "center", "scale") + (("body_pose", "has_body_pose") if require_pose else ())
            missing = [k for k in needed if k not in keys]
            if missing:
                why = " (training needs the SMPL poses; evaluate.py reads a file without them)" if require_pose else ""
                if require_pose and "body_pose" in missing and "part" in keys:
                    why += (". SPIN's COCO, MPII and Human3.6M npz carry no SMPL pose (SPIN keeps its fits apart, in "
                            "data/static_fits, which is not read here); of its training files only "
                            "mpi_inf_3dhp_train.npz has them")
                raise DataFormatError(f"{_where(name, npz_path)}: missing {missing} (keys: {sorted(keys)}); "
                                      f"expected {self.SCHEMA}{why}")
            arr = {k: z[alias.get(k, k)] for k in ["imgname", "scale", *self.SHAPES] if alias.get(k, k) in z.files}
            if spin and "has_smpl" not in z.files:
                arr["has_body_pose"] = np.ones(len(arr["imgname"]))
        scale_in_200px = scale_in_200px or spin
        N = len(arr["imgname"])
        if N == 0:
            raise DataFormatError(f"{_where(name, npz_path)}: no records (imgname is empty); expected {self.SCHEMA}")
        for k, v in arr.items():
            if v.dtype.kind not in ("US" if k == "imgname" else "fiub"):
                raise DataFormatError(f"{_where(name, npz_path)}: {k} has dtype {v.dtype}; expected "
                                      f"{'strings' if k == 'imgname' else 'numbers'} ({self.SCHEMA})")
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
        self.has_pose = (arr["has_body_pose"] > 0) if "body_pose" in arr and "has_body_pose" in arr \
            else np.zeros(N, dtype=bool)  # (N,) records with an SMPL pose
        self.rows = np.flatnonzero(self.has_pose) if require_pose else np.arange(N)  # the records served
        if len(self.rows) == 0:
            raise DataFormatError(f"{_where(name, npz_path)}: no record has has_body_pose > 0" if require_pose
                                  else f"{_where(name, npz_path)}: no records")

    def __len__(self) -> int:
        return len(self.rows)

    def _imgname(self, r: int) -> str:
        rel = self.arr["imgname"][r]
        return rel.decode() if isinstance(rel, bytes) else str(rel)

    def preflight(self) -> list:
        """Problems that drawing a record would meet only then: non-finite poses or centres, box sizes
        <= 0 (every served record), missing images (IMAGE_SAMPLE records spread over them)."""
        a, rows, problems = self.arr, self.rows, []
        bad = ~np.isfinite(a["center"][rows]).all(1) | ~(self.box_wh[rows] > 0).all(1)
        if "body_pose" in a:
            bad |= self.has_pose[rows] & ~np.isfinite(a["body_pose"][rows]).all(1)
        if bad.any():
            problems.append(f"{_where(self.name, self.npz_path, int(rows[bad][0]))}: non-finite pose or center, or a "
                            f"box size <= 0, in {int(bad.sum())} record(s), first {rows[bad][:5].tolist()}; remove "
                            "those records from the npz or use the original file")
        sample = [(int(r), self._imgname(int(r))) for r in rows[_spread(len(rows))]]
        return problems + _missing_images(self.name, self.img_dir, sample, HMR2_DATA_SOURCE)

    def __getitem__(self, i: int) -> Sample:
        return self.draw(int(i), np.random.default_rng((self.seed, int(i))))

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Record i in a prompt paraphrase drawn from rng (`Mixture` passes its own per draw)."""
        return self.sample(int(i), int(rng.integers(len(PROMPTS["image_to_pose"]))))

    def sample(self, i: int, paraphrase: int = 0) -> Sample:
        r = int(self.rows[i])
        a = self.arr
        rel = self._imgname(r)
        pose = a["body_pose"][r].astype(np.float64).reshape(1, body.NUM_JOINTS, 3) if self.has_pose[r] else None
        if (pose is not None and not np.isfinite(pose).all()) or not np.isfinite(a["center"][r]).all() \
                or not (self.box_wh[r] > 0).all():
            raise DataFormatError(f"{_where(self.name, self.npz_path, r)} ({rel}): non-finite pose or center, or a "
                                  f"box size <= 0 ({self.box_wh[r]})")
        image = _load_rgb(self.name, os.path.join(self.img_dir, rel), f"record {r} of {self.npz_path}", HMR2_DATA_SOURCE)
        crop = crop_person(image, a["center"][r], self.box_wh[r], self.image_size)
        pose6d = joints = None
        if pose is not None:
            betas = a["betas"][r:r + 1] if "betas" in a and a.get("has_betas", np.ones(r + 1))[r] > 0 else None
            pose6d, joints = _targets(pose, self.bodymodel, betas)
            pose6d, joints = pose6d[0], None if joints is None else joints[0]
        return Sample("image_to_pose", PROMPTS["image_to_pose"][paraphrase], POSE_ANSWER, image=crop,
                      pose6d=pose6d, joints=joints, index=i)

    def gt_lsp14(self) -> np.ndarray:
        """HMR2.0's evaluation target of every pose record: the 14 LSP joints of the npz's
        `extra_keypoints_3d` (its keypoints 25..37 and 43), minus its pelvis (keypoint 39), metres,
        (N, 14, 3) in the order of this dataset's samples."""
        if "extra_keypoints_3d" not in self.arr:
            raise DataFormatError(f"{_where(self.name, self.npz_path)}: no extra_keypoints_3d (N, 19, 4); HMR2.0's "
                                  "protocol reads its 3D ground truth there (else use metrics.lsp14_from_vertices)")
        kp = self.arr["extra_keypoints_3d"][self.rows, :, :3].astype(np.float64)  # (N, 19, 3) m
        bad = self.rows[~np.isfinite(kp).all(axis=(1, 2))]
        if len(bad):
            raise DataFormatError(f"{_where(self.name, self.npz_path, int(bad[0]))}: NaN/inf ground-truth keypoints "
                                  f"(extra_keypoints_3d) in {len(bad)} record(s), first {bad[:5].tolist()}; remove "
                                  "those records from the npz or use the original file")
        _, lsp14, pelvis = metrics.REGRESSOR_LAYOUTS[19]
        return kp[:, list(lsp14)] - kp[:, pelvis:pelvis + 1]


class BEDLAMScript(torch.utils.data.Dataset):
    """Image-text samples of BEDLAM-Script (PoseEmbroider, Delmas et al. 2024; §4.1 (3)).

    Files, as PoseEmbroider's processing (do.sh) writes them and its datasets/bedlam_script.py reads
    them, split = "training" or "validation":
        processed_dir/bedlam_{split}_try.pkl    {image path: [per human: {"smplx_root_cam" (3,),
            "smplx_global_orient" (1, 3), "smplx_body_pose" (21, 3), "smplx_tight_bbox" (4,) x1 y1 x2 y2,
            ...}]} (step 2; any shape of 3, 63 and 4 values is read)
        processed_dir/imgpaths_bedlam_to_selected_human_index_{split}_try.pkl
                                                 {"criteria": {"scale_factor": s, ...}, image path: [human index]}
        processed_dir/farther_sample_{split}_{M}_try.pt   [references, selected data ids, distances] (step 4)
        processed_dir/bedlam_{split}_3caps_fs{N}_try.pkl  {i: [3 captions]} (step 5, --farther_sample N):
                                                 caption i describes the i-th, in data id order, of the first
                                                 N ids of the farther sampling; or bedlam_{split}_3caps_try.pkl
                                                 (step 5 without --farther_sample): every selected human
        img_dir/{split}/<image path>             (`closeup` images are stored turned 90 deg: turned back)
    Data ids count the selected humans over the sorted image paths; only the captioned ones are
    samples. task "describe" gives vqa-kind samples (image -> the caption, no pose); task
    "image_to_pose" gives the camera-frame pose (SMPL-X's 21 body joints as SMPL's, hands at identity).
    """

    NAME = "BEDLAM-Script"
    HUMAN_SIZES = {"smplx_root_cam": 3, "smplx_body_pose": 63, "smplx_tight_bbox": 4}

    @classmethod
    def captioned_ids(cls, processed_dir: str, split: str):
        """(the caption file, the data ids it describes, in order: None for every selected human)."""
        fs = sorted(glob.glob(os.path.join(glob.escape(processed_dir), f"bedlam_{split}_3caps_fs*_try.pkl")))
        if not fs:
            return os.path.join(processed_dir, f"bedlam_{split}_3caps_try.pkl"), None
        if len(fs) > 1:
            raise DataFormatError(f"{cls.NAME}: {processed_dir} holds {len(fs)} caption files for {split} "
                                  f"({', '.join(map(os.path.basename, fs))}); keep the one to train on")
        n = int(re.search(r"_fs(\d+)_try\.pkl$", fs[0]).group(1))
        pts = glob.glob(os.path.join(glob.escape(processed_dir), f"farther_sample_{split}_*_try.pt"))
        sizes = {int(m.group(1)): p for p in pts if (m := re.search(r"_(\d+)_try\.pt$", p))}
        if not sizes:
            raise FileNotFoundError(f"{cls.NAME}: {fs[0]} describes a farther-sampled subset, but no "
                                    f"farther_sample_{split}_<M>_try.pt is in {processed_dir}; it comes from "
                                    f"{BEDLAM_SCRIPT_SOURCE} (step 4)")
        pt = sizes[max(sizes)]
        try:  # numpy scalars in the file's references, pickled by numpy 2 or 1
            from numpy._core.multiarray import scalar
        except ImportError:
            from numpy.core.multiarray import scalar
        numpy_types = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
                       *{type(np.dtype(t)) for t in (np.int32, np.int64, np.float32, np.float64)}]
        try:
            with torch.serialization.safe_globals(numpy_types):
                selected = torch.load(pt, map_location="cpu", weights_only=True)[1]
            selected = [int(i) for i in selected]
        except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same message
            raise DataFormatError(f"{_where(cls.NAME, pt)}: expected [references, selected data ids, distances] as "
                                  f"PoseEmbroider's process_bedlam_step4.py saves it ({type(err).__name__}: {err})") \
                from None
        if len(selected) < n:
            raise DataFormatError(f"{_where(cls.NAME, pt)}: selects {len(selected)} humans, fewer than the {n} that "
                                  f"{os.path.basename(fs[0])} describes")
        return fs[0], set(selected[:n])

    def __init__(self, processed_dir: str, img_dir: str, split: str = "training", task: str = "describe",
                 image_size: int = 336, bodymodel=None, seed: int = 0):
        split = {"train": "training", "val": "validation"}.get(split, split)
        if split not in ("training", "validation") or task not in ("describe", "image_to_pose"):
            raise ValueError(f"{self.NAME}: split must be training or validation and task describe or "
                             f"image_to_pose, got {split!r}, {task!r}")
        self.task, self.image_size, self.bodymodel, self.seed = task, image_size, bodymodel, seed
        self.img_dir = os.path.join(_need(self.NAME, img_dir, "image directory", BEDLAM_SCRIPT_SOURCE), split) \
            if img_dir else None  # None: poses and captions only (retrieval.py)
        ann_path = self.ann_path = os.path.join(processed_dir, f"bedlam_{split}_try.pkl")
        sel_path = os.path.join(processed_dir, f"imgpaths_bedlam_to_selected_human_index_{split}_try.pkl")
        cap_path, captioned = self.captioned_ids(processed_dir, split)
        ann = _read_pickle(self.NAME, ann_path, BEDLAM_SCRIPT_SOURCE)
        sel = dict(_read_pickle(self.NAME, sel_path, BEDLAM_SCRIPT_SOURCE))
        caps = _read_pickle(self.NAME, cap_path, BEDLAM_SCRIPT_SOURCE)
        criteria = sel.pop("criteria", None)
        if not isinstance(criteria, dict) or "scale_factor" not in criteria:
            raise DataFormatError(f"{_where(self.NAME, sel_path, 'criteria')}: expected a dict with 'scale_factor'")
        self.scale_factor = float(criteria["scale_factor"])
        self.items, cut = [], []  # (image path, human dict, captions); lengths of the captions cut
        data_id = 0
        for img in sorted(ann):
            for h in sel.get(img, []):
                humans = ann[img]
                if not isinstance(h, (int, np.integer)) or not 0 <= h < len(humans):
                    raise DataFormatError(f"{_where(self.NAME, sel_path, img)}: human index {h!r} out of range for "
                                          f"{len(humans)} humans in {ann_path}")
                if captioned is not None and data_id not in captioned:
                    data_id += 1
                    continue
                human = humans[h]
                missing = [k for k in self.HUMAN_SIZES if k not in human]
                sizes = {k: np.size(human[k]) for k in self.HUMAN_SIZES if k in human}
                if missing or sizes != self.HUMAN_SIZES:
                    raise DataFormatError(f"{_where(self.NAME, ann_path, f'{img} human {h}')}: missing {missing}, "
                                          f"sizes {sizes}; expected {self.HUMAN_SIZES} values")
                key = len(self.items)  # caption i: the i-th captioned human
                texts = caps.get(key) if isinstance(caps, dict) else None
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise DataFormatError(f"{_where(self.NAME, cap_path, key)}: expected a list of captions for "
                                          f"data id {data_id} ({img}, human {h})")
                self.items.append((img, human, _checked_captions(self.NAME, cap_path, key, list(texts), cut)))
                data_id += 1
        if not self.items:
            raise DataFormatError(f"{self.NAME}: {sel_path} selects no human" + (
                "" if captioned is None else f" among the {len(captioned)} data ids {os.path.basename(cap_path)} describes"))
        if isinstance(caps, dict) and len(caps) != len(self.items):
            raise DataFormatError(f"{_where(self.NAME, cap_path)}: {len(caps)} captioned humans, but the selection "
                                  f"and farther sampling give {len(self.items)}; the files come from different runs")
        _warn_cut(self.NAME, cap_path, cut)

    def __len__(self) -> int:
        return len(self.items)

    def preflight(self) -> list:
        """Problems of the images of IMAGE_SAMPLE humans spread over the captioned ones: missing files."""
        sample = [(i, self.items[i][0]) for i in _spread(len(self.items))]
        return _missing_images(self.NAME, self.img_dir, sample, BEDLAM_SCRIPT_SOURCE) if self.img_dir else []

    def text_pose_aa(self) -> np.ndarray:
        """Every captioned human's pose in the text-to-pose frame (`text_pose_frame`), (N, 24, 3) axis-angle,
        SMPL-X's 21 body joints as SMPL's, hands at identity. BEDLAM's y-up world orientation
        (smplx_global_orient) is turned into AMASS's z-up one first, as PoseEmbroider does (its bedlam.py)."""
        out = np.zeros((len(self.items), body.NUM_JOINTS, 3))
        for i, (img, human, _) in enumerate(self.items):
            if np.size(human.get("smplx_global_orient", ())) != 3:
                raise DataFormatError(f"{_where(self.NAME, self.ann_path, img)}: captioned human {i} has no "
                                      "smplx_global_orient (3 values); the text-to-pose pose needs the world orientation "
                                      f"that {BEDLAM_SCRIPT_SOURCE} (step 2) writes")
            orient = _Y_UP.T @ body.axis_angle_to_matrix(torch.as_tensor(
                np.asarray(human["smplx_global_orient"], dtype=np.float64).reshape(1, 3))).numpy()[0]
            out[i, 0] = text_pose_frame(body.matrix_to_axis_angle(torch.as_tensor(orient[None])).numpy())[0]
            out[i, 1:22] = np.asarray(human["smplx_body_pose"], dtype=np.float64).reshape(21, 3)
        return out

    def __getitem__(self, i: int) -> Sample:
        return self.draw(int(i), np.random.default_rng((self.seed, int(i))))

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Human i with a caption and a prompt paraphrase drawn from rng (`Mixture` passes its own per draw)."""
        caption = int(rng.integers(len(self.items[i][2])))
        return self.sample(int(i), caption, int(rng.integers(len(PROMPTS["image_to_pose"]))))

    def sample(self, i: int, caption: int = 0, paraphrase: int = 0) -> Sample:
        from PIL import Image

        img, human, texts = self.items[i]
        if self.img_dir is None:
            raise ValueError(f"{self.NAME}: no image directory was given; pass img_dir to draw image samples")
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
        aa[0, 0] = np.asarray(human["smplx_root_cam"], dtype=np.float64).reshape(3)
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
                if not isinstance(rec.get("image", ""), str):
                    raise DataFormatError(f"{_where(self.NAME, json_path, rid)}: \"image\" is a "
                                          f"{type(rec['image']).__name__}; expected a file name in the image directory")
                question = " ".join(q["value"].replace(IMAGE_TOKEN, " ").split())
                self.turns.append((k, rec.get("image"), question, a["value"].strip()))
        if not self.turns:
            raise DataFormatError(f"{_where(self.NAME, json_path)}: no conversation records")

    def __len__(self) -> int:
        return len(self.turns)

    def preflight(self) -> list:
        """Problems of the images of IMAGE_SAMPLE records spread over those that name one: missing files."""
        named = [(k, image) for k, image, _, _ in self.turns if image is not None]
        return _missing_images(self.NAME, self.image_dir, [named[i] for i in _spread(len(named))], LLAVA_INSTRUCT_SOURCE)

    def draw(self, i: int, rng: np.random.Generator) -> Sample:
        """Turn i (nothing to draw: `Mixture`'s interface)."""
        return self[i]

    def __getitem__(self, i: int) -> Sample:
        k, image_file, question, answer = self.turns[i]
        if image_file is None:
            return Sample("vqa", question, answer, index=i, text=question)
        image = _load_rgb(self.NAME, os.path.join(self.image_dir, image_file), f"record {k} of {self.json_path}",
                          LLAVA_INSTRUCT_SOURCE)
        return Sample("vqa", IMAGE_TOKEN + "\n" + question, answer, image=pad_to_square(image, self.image_size),
                      index=i, text=question)


class Mixture(torch.utils.data.Dataset):
    """A deterministic weighted mixture of datasets: sample i draws a dataset (by weight), a uniform
    index j into it, and that item's caption and prompt paraphrase (`ds.draw(j, rng)`), all from
    np.random.default_rng((seed, i)). Each index is an independent draw, so a training loop that
    samples indices from a large `length` (data.FRESH_DRAWS) reaches every item with every caption; a length
    equal to the data size would fix a pool of that many (item, caption) pairs, about 1 - 1/e of the
    items, for the whole run.

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
        return ds.draw(int(rng.integers(len(ds))), rng)


# ---- real runs: every asset and data file checked before anything is built (--preset llava-1.5-7b) ----

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
        need("llava_path", args.llava_path, presets.LLAVA_SOURCE, inside="config.json")
        need("hmr2_ckpt", args.hmr2_ckpt, posevit.HMR2_SOURCE)
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
    fix = f"download it again: {presets.LLAVA_SOURCE}" if script == "sft" else "run train_sft.py again into another --out_dir"
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
        except (DataFormatError, FileNotFoundError, ValueError) as err:
            problems.append(f"{flag}: {err}")
            return
        problems.extend(f"{flag}: {p}" for p in ds.preflight())
        kinds[kind].append(ds)

    if args.posescript_dir:
        add("text_to_pose", "--posescript_dir / --amass_dir", lambda: PoseScript(
            args.posescript_dir, args.amass_dir, "train", bodymodel=bodymodel, seed=seed))
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

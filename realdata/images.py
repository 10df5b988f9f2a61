"""Image datasets: HMR2.0-style npz sets (3DPW, Human3.6M, MPI-INF-3DHP, ...) for image-to-pose with
HMR2.0's LSP14 evaluation joints, and BEDLAM-Script's images with descriptions; the person crops both use."""
from __future__ import annotations

import glob
import os
import re

import numpy as np
import torch

import body
from data import POSE_ANSWER, PROMPTS, Sample
from realdata.common import (BEDLAM_SCRIPT_SOURCE, _checked_captions, DataFormatError, DESCRIBE_PROMPT,
                             HMR2_DATA_SOURCE, _load_npz, _missing_images, _need, _read_pickle, _spread, _warn_cut,
                             _where)
from realdata.posescript import _targets, text_pose_frame, _Y_UP


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
        self.name, self.npz_path, self.image_size = name, npz_path, image_size
        self.bodymodel, self.seed = bodymodel, seed
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
        image = _load_rgb(self.name, os.path.join(self.img_dir, rel), f"record {r} of {self.npz_path}",
                          HMR2_DATA_SOURCE)
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
                                  "protocol reads its 3D ground truth there (else use lsp14_from_vertices)")
        kp = self.arr["extra_keypoints_3d"][self.rows, :, :3].astype(np.float64)  # (N, 19, 3) m
        bad = self.rows[~np.isfinite(kp).all(axis=(1, 2))]
        if len(bad):
            raise DataFormatError(f"{_where(self.name, self.npz_path, int(bad[0]))}: NaN/inf ground-truth keypoints "
                                  f"(extra_keypoints_3d) in {len(bad)} record(s), first {bad[:5].tolist()}; remove "
                                  "those records from the npz or use the original file")
        _, lsp14, pelvis = REGRESSOR_LAYOUTS[19]
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
            among = "" if captioned is None else \
                f" among the {len(captioned)} data ids {os.path.basename(cap_path)} describes"
            raise DataFormatError(f"{self.NAME}: {sel_path} selects no human{among}")
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
                                      "smplx_global_orient (3 values); the text-to-pose pose needs the world "
                                      f"orientation that {BEDLAM_SCRIPT_SOURCE} (step 2) writes")
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
        centre, size = ((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1 + 2 * pad, y2 - y1 + 2 * pad)
        crop = crop_person(image, centre, size, self.image_size)
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


# ---- Evaluation joints: HMR2.0's 3DPW / Human3.6M protocol ----------------------------------
# 14 LSP joints (ankles, knees, hips, wrists, elbows, shoulders, neck, head) regressed from the
# mesh by a user-supplied regressor, minus the regressor's pelvis, errors in millimetres. Two
# regressor files are common: SPIN's J_regressor_h36m.npy (17 H36M joints, pelvis = 0) and
# 4D-Humans' SMPL_to_J19.pkl (19 extra joints, pelvis = 14; HMR2.0's eval keypoints 25..37 and 43
# minus keypoint 39). Both map the official SMPL mesh (6890 vertices), not the procedural one.
# Against 4D-Humans' eval npz (its extra_keypoints_3d are J19 joints) only the second is the
# protocol; evaluate.py refuses the first there.

H36M_TO_LSP14 = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10)  # SPIN's H36M_TO_J14
J19_TO_LSP14 = tuple(range(13)) + (18,)
REGRESSOR_LAYOUTS = {17: ("H36M", H36M_TO_LSP14, 0), 19: ("J19", J19_TO_LSP14, 14)}  # rows: (name, LSP14, pelvis)


def load_joint_regressor(path: str) -> np.ndarray:
    """A joint regressor file (.npy, or a numpy/scipy-sparse pickle read without scipy) -> (K, V)
    float64, K in REGRESSOR_LAYOUTS (17: J_regressor_h36m.npy; 19: SMPL_to_J19.pkl)."""
    from smpl_pickle import _SMPLUnpickler, _SparseStandIn, _sparse_to_dense

    if not os.path.isfile(path):
        raise FileNotFoundError(f"joint regressor {path} not found; J_regressor_h36m.npy comes from SPIN's "
                                "fetch_data.sh (github.com/nkolot/SPIN), SMPL_to_J19.pkl from 4D-Humans' hmr2_data")
    if path.endswith(".npy"):
        reg = np.load(path, allow_pickle=False)
    else:
        with open(path, "rb") as fh:
            reg = _SMPLUnpickler(fh, path).load()
        reg = _sparse_to_dense(reg, "regressor", path) if isinstance(reg, _SparseStandIn) else np.asarray(reg)
    if reg.ndim != 2 or reg.shape[0] not in REGRESSOR_LAYOUTS:
        raise ValueError(f"{path}: regressor has shape {reg.shape}; expected (17, V) (H36M) or (19, V) (HMR2.0's J19)")
    return reg.astype(np.float64)


def lsp14_from_vertices(vertices, regressor: np.ndarray) -> torch.Tensor:
    """(B, V, 3) mesh vertices, metres -> (B, 14, 3) LSP joints minus the regressor's pelvis, metres."""
    v = body.check_tensor(vertices, "vertices", (3,), "lsp14_from_vertices")
    reg = torch.as_tensor(np.asarray(regressor), dtype=v.dtype, device=v.device)
    if v.dim() != 3 or reg.dim() != 2 or reg.shape[1] != v.shape[1] or reg.shape[0] not in REGRESSOR_LAYOUTS:
        raise ValueError(f"lsp14_from_vertices: vertices {tuple(v.shape)} and regressor {tuple(reg.shape)}; expected "
                         "(B, V, 3) and (17 or 19, V) with the same V (the official SMPL mesh has 6890)")
    _, lsp, pelvis = REGRESSOR_LAYOUTS[reg.shape[0]]
    joints = torch.einsum("kv,bvc->bkc", reg, v)  # (B, K, 3)
    return joints[:, list(lsp)] - joints[:, pelvis:pelvis + 1]


def lsp14_mpjpe_mm(pred, gt) -> torch.Tensor:
    """MPJPE of pelvis-aligned LSP joints (from `lsp14_from_vertices` or realdata.HMR2ImageDataset.gt_lsp14),
    no further alignment: (B, 14, 3), (B, 14, 3) metres -> (B,) millimetres. PA-MPJPE: metrics.pa_mpjpe_mm."""
    p = body.check_tensor(pred, "pred", (14, 3), "lsp14_mpjpe_mm").double()
    g = body.check_tensor(gt, "gt", (14, 3), "lsp14_mpjpe_mm").double()
    if p.shape != g.shape:
        raise ValueError(f"lsp14_mpjpe_mm: pred {tuple(p.shape)} and gt {tuple(g.shape)} differ")
    return (p - g.to(p.device)).norm(dim=-1).mean(-1) * 1000.0

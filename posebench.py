"""PoseBench: the built-in benchmark for image-to-pose, text-to-pose and pose VQA.

Pose-RFT (§4.1) trains and evaluates on PoseScript, 3DPW, Human3.6M, BEDLAM-Script and
LLaVA-Instruct, none of which can be downloaded at run time. This file builds a miniature
stand-in from nothing but the SMPL skeleton (body.py), keeping the paper's central
difficulty: one input fits many poses.

- Poses: about 18 action archetypes (standing, walking, sitting, squatting, kneeling, lying,
  bending forward, arms raised, T-pose, reaching, kicking, ...), each a mean joint
  configuration plus random joint angles, clipped to anatomical limits. Each pose keeps its
  archetype label (the abstract prompt, CoT-Pose style).
- Captions, PoseScript style (Delmas et al., ECCV 2022): boolean posecodes are measured on
  the joints (elbow bent or straight, hand above head, hands together, feet apart, knee
  raised, torso leaning, lying vs upright, ...); each caption states a random subset of the
  pose's true posecodes, so one caption fits many poses, as human descriptions do.
- Images: the posed mesh rendered (render.py) to a small RGB image (64 x 64, z-buffered, flat shaded,
  left limbs blue, right limbs orange) from a random camera yaw, elevation and distance,
  cropped around the person: depth is lost, as in a photo.
- VQA: yes/no questions answered from posecodes ("Is the left hand above the head?" ->
  "Yes, the left hand is above the head.").
- Pose editing: pairs (A, B) within a split, B the nearest pose of A's archetype that
  gains 1-4 posecodes, and instructions naming exactly the gained posecodes (`load_edits`, cached
  beside the split); `stated_codes` parses a caption or an instruction back to its posecodes.
- Abstract prompts (issue 22, CoT-Pose): three phrases per archetype (`ARCHETYPE_PHRASES`, "someone
  kneeling") and how often each posecode is true of an archetype's poses (`archetype_code_freq`):
  what a reasoning about the archetype may plausibly state.
- Splits by pose, each from its own random stream (no pose is in two splits; the test split
  does not change when the training size does), cached on disk keyed by the configuration.

Frames. Poses are stored with a canonical global orientation: the pose's own tilt
(lying, bending), yaw zero, the body facing +z (PoseScript's normalisation: text-to-pose
targets). The image-to-pose target is the same body in the camera's view frame (x right,
y up, z towards the camera): `global_orient_view`, `joints_view`. Joints are pelvis-centred,
metres, SMPL order.

Departures from the paper's data: synthetic mannequin renders instead of photographs;
automatic captions only (PoseScript also has human-written ones); yes/no VQA only.

Run:
    python posebench.py                  # build the default sizes (cached), print stats, write a preview PNG
    python posebench.py --n_train 2000   # any field of BenchConfig is a flag; see --help
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

import body
import plumbing
import posecodes
from render import face_colours, render, view_rotation

POSEBENCH_VERSION = 1  # bump when sampling, captions or rendering change: part of the cache key
SPLITS = ("train", "val", "test")


@dataclass
class BenchConfig:
    """What the benchmark is built from; every field is part of the cache key."""
    n_train: int = field(default=20000, metadata={"help": "poses in the training split"})
    n_val: int = field(default=1000, metadata={"help": "poses in the validation split"})
    n_test: int = field(default=1000, metadata={"help": "poses in the test split"})
    image_size: int = field(default=64, metadata={"help": "rendered image side, pixels"})
    supersample: int = field(default=1, metadata={"help": "render at this factor and average down (anti-aliasing)"})
    captions_per_pose: int = field(default=3, metadata={"help": "automatic captions per pose"})
    vqa_per_pose: int = field(default=2, metadata={"help": "yes/no questions per pose"})
    yaw_range_deg: float = field(default=120.0, metadata={"help": "camera yaw drawn from +-this around the front"})
    elevation_range_deg: list[float] = field(default_factory=lambda: [-10.0, 30.0],
                                             metadata={"help": "camera elevation range (two numbers)"})
    distance_range_m: list[float] = field(default_factory=lambda: [3.0, 5.0],
                                          metadata={"help": "camera distance range (two numbers)"})
    seed: int = field(default=0, metadata={"help": "seed of every random stream"})
    smpl_path: str = field(default=None, metadata={"help": "licensed SMPL model pickle; default: the procedural body"})


# ---- Poses: archetypes inside anatomical limits ----------------------------------------------
# Joint angles are Euler angles in degrees, R = Ry(y) Rx(x) Rz(z) in the joint's parent frame
# (SMPL frame: +x body-left, +y up, +z forward). With this order, for the left arm (along +x at
# rest) z raises (+) or lowers (-) it in the frontal plane, then x swings a lowered arm
# forward (-) or back (+), and y swings a horizontal arm forward (-). For legs (along -y) x
# flexes the hip (-: thigh forward) and knee (+: shin back). Spine x > 0 leans forward.
# Values are written for the LEFT side; right-side joints use the mirror (x, -y, -z), so
# the same numbers give a symmetric pose. Root: x > 0 pitches forward, z rolls.

LIMITS_DEG = {  # (x, y, z) ranges, left side / midline
    "pelvis": ((-100, 100), (-15, 15), (-100, 100)),
    "left_hip": ((-130, 35), (-45, 45), (-30, 80)),
    "left_knee": ((0, 150), (-5, 5), (-5, 5)),
    "left_ankle": ((-35, 45), (-15, 15), (-20, 20)),
    "left_foot": ((-20, 20), (-5, 5), (-5, 5)),
    "spine1": ((-20, 45), (-25, 25), (-20, 20)),
    "spine2": ((-20, 45), (-25, 25), (-20, 20)),
    "spine3": ((-20, 45), (-25, 25), (-20, 20)),
    "neck": ((-30, 40), (-40, 40), (-25, 25)),
    "head": ((-30, 35), (-40, 40), (-25, 25)),
    "left_collar": ((-10, 10), (-20, 15), (-15, 25)),
    "left_shoulder": ((-110, 60), (-110, 45), (-90, 110)),
    "left_elbow": ((-60, 60), (-150, 0), (-5, 5)),
    "left_wrist": ((-40, 40), (-40, 40), (-60, 60)),
    "left_hand": ((-10, 10), (-20, 20), (-20, 20)),
}

_ARMS_DOWN = {"left_shoulder": (0, 0, -75), "right_shoulder": (0, 0, -75),
              "left_elbow": (0, -10, 0), "right_elbow": (0, -10, 0)}
# name: (mean angles per joint, noise std in degrees, asymmetric). An asymmetric archetype is
# mirrored left <-> right with probability 1/2, so each side does the action equally often.
ARCHETYPES = {
    "standing": ({**_ARMS_DOWN, "left_knee": (5, 0, 0), "right_knee": (5, 0, 0)}, 8, False),
    "walking": ({"left_hip": (-25, 0, 3), "right_hip": (15, 0, 3), "left_knee": (15, 0, 0),
                 "right_knee": (35, 0, 0), "left_shoulder": (20, 0, -75), "right_shoulder": (-20, 0, -75),
                 "left_elbow": (0, -20, 0), "right_elbow": (0, -25, 0)}, 8, True),
    "running": ({"left_hip": (-55, 0, 5), "right_hip": (20, 0, 5), "left_knee": (70, 0, 0),
                 "right_knee": (95, 0, 0), "left_shoulder": (35, 0, -70), "right_shoulder": (-45, 0, -70),
                 "left_elbow": (0, -90, 0), "right_elbow": (0, -90, 0), "spine1": (10, 0, 0)}, 8, True),
    "sitting": ({"left_hip": (-90, 0, 8), "right_hip": (-90, 0, 8), "left_knee": (90, 0, 0),
                 "right_knee": (90, 0, 0), "left_shoulder": (-25, 0, -75), "right_shoulder": (-25, 0, -75),
                 "left_elbow": (0, -60, 0), "right_elbow": (0, -60, 0)}, 9, False),
    "squatting": ({"pelvis": (20, 0, 0), "left_hip": (-115, 0, 20), "right_hip": (-115, 0, 20),
                   "left_knee": (135, 0, 0), "right_knee": (135, 0, 0), "left_ankle": (25, 0, 0),
                   "right_ankle": (25, 0, 0), "spine1": (15, 0, 0), "spine2": (10, 0, 0),
                   "left_shoulder": (-70, 0, -65), "right_shoulder": (-70, 0, -65)}, 8, False),
    "kneeling": ({**_ARMS_DOWN, "left_hip": (-5, 0, 5), "right_hip": (-5, 0, 5), "left_knee": (95, 0, 0),
                  "right_knee": (95, 0, 0), "left_ankle": (-25, 0, 0), "right_ankle": (-25, 0, 0)}, 8, False),
    "kneeling_on_one_knee": ({**_ARMS_DOWN, "left_hip": (-90, 0, 5), "left_knee": (90, 0, 0),
                              "right_hip": (0, 0, 5), "right_knee": (95, 0, 0)}, 8, True),
    "lying_on_back": ({"pelvis": (-90, 0, 0), "left_shoulder": (0, 0, -55), "right_shoulder": (0, 0, -55),
                       "left_knee": (10, 0, 0), "right_knee": (10, 0, 0)}, 14, False),
    "lying_on_side": ({"pelvis": (0, 0, 90), "left_hip": (-40, 0, 0), "right_hip": (-30, 0, 0),
                       "left_knee": (50, 0, 0), "right_knee": (40, 0, 0), "left_shoulder": (-40, 0, -60),
                       "right_shoulder": (-50, 0, -60), "left_elbow": (0, -40, 0)}, 10, True),
    "lying_on_front": ({"pelvis": (90, 0, 0), "left_shoulder": (0, 0, 60), "right_shoulder": (0, 0, 60),
                        "left_elbow": (0, -30, 0), "right_elbow": (0, -30, 0)}, 12, False),
    "bending_forward": ({"spine1": (30, 0, 0), "spine2": (25, 0, 0), "spine3": (20, 0, 0),
                         "left_hip": (-45, 0, 3), "right_hip": (-45, 0, 3), "left_shoulder": (-70, 0, -80),
                         "right_shoulder": (-70, 0, -80)}, 8, False),
    "arms_raised": ({"left_shoulder": (0, 0, 85), "right_shoulder": (0, 0, 85), "left_elbow": (0, -5, 0),
                     "right_elbow": (0, -5, 0)}, 9, False),
    "t_pose": ({}, 5, False),
    "reaching_forward": ({"left_shoulder": (-85, 0, -80), "left_elbow": (0, -5, 0), "right_shoulder": (0, 0, -75),
                          "spine1": (10, 0, 0)}, 8, True),
    "kicking": ({"left_hip": (-75, 0, 5), "left_knee": (10, 0, 0), "right_hip": (5, 0, 3),
                 "left_shoulder": (0, 0, -30), "right_shoulder": (0, 0, -30), "spine1": (-10, 0, 0)}, 8, True),
    "raising_one_hand": ({"left_shoulder": (0, 0, 100), "left_elbow": (0, -45, 0),
                          "right_shoulder": (0, 0, -75), "right_elbow": (0, -10, 0)}, 9, True),
    "lunging": ({**_ARMS_DOWN, "left_hip": (-80, 0, 5), "left_knee": (85, 0, 0), "right_hip": (25, 0, 5),
                 "right_knee": (40, 0, 0)}, 8, True),
    "clapping": ({"left_shoulder": (-80, -20, -90), "right_shoulder": (-80, -20, -90), "left_elbow": (0, -10, 0),
                  "right_elbow": (0, -10, 0)}, 6, False),
    "star_jump": ({"left_shoulder": (0, 0, 60), "right_shoulder": (0, 0, 60), "left_hip": (0, 0, 25),
                   "right_hip": (0, 0, 25)}, 8, False),
}
ARCHETYPE_NAMES = tuple(ARCHETYPES)


def _euler_to_matrix(deg: np.ndarray) -> np.ndarray:
    """(..., 3) Euler angles (x, y, z) in degrees -> (..., 3, 3), R = Ry(y) Rx(x) Rz(z)."""
    x, y, z = np.deg2rad(deg).transpose(-1, *range(deg.ndim - 1))
    c, s, o, i = np.cos, np.sin, np.zeros_like(x), np.ones_like(x)
    rx = np.stack([i, o, o, o, c(x), -s(x), o, s(x), c(x)], -1).reshape(*x.shape, 3, 3)
    ry = np.stack([c(y), o, s(y), o, i, o, -s(y), o, c(y)], -1).reshape(*x.shape, 3, 3)
    rz = np.stack([c(z), -s(z), o, s(z), c(z), o, o, o, i], -1).reshape(*x.shape, 3, 3)
    return ry @ rx @ rz


def _left_name(j: int) -> str:
    return body.SMPL_JOINT_NAMES[j].replace("right_", "left_")


MIRROR = np.array([body.JOINT_INDEX[n.replace("left_", "@").replace("right_", "left_").replace("@", "right_")]
                   for n in body.SMPL_JOINT_NAMES])  # joint index of each joint's mirror image


def sample_poses(n: int, rng: np.random.Generator):
    """Sample n poses. Returns (archetype ids (n,), Euler angles (n, 24, 3) degrees in each
    joint's own convention, axis-angle pose (n, 24, 3) radians, canonical yaw)."""
    arch = rng.integers(len(ARCHETYPES), size=n)
    deg = np.zeros((n, body.NUM_JOINTS, 3))
    lo = np.array([[r[0] for r in LIMITS_DEG[_left_name(j)]] for j in range(body.NUM_JOINTS)])
    hi = np.array([[r[1] for r in LIMITS_DEG[_left_name(j)]] for j in range(body.NUM_JOINTS)])
    for a, name in enumerate(ARCHETYPE_NAMES):
        idx = np.flatnonzero(arch == a)
        means, std, asym = ARCHETYPES[name]
        mean = np.zeros((body.NUM_JOINTS, 3))
        for jn, v in means.items():
            mean[body.JOINT_INDEX[jn]] = v
        d = mean + std * rng.standard_normal((len(idx), body.NUM_JOINTS, 3))
        d[:, 0, 1] = 0.0  # the root's yaw is canonical (zero); the camera supplies the view
        d = np.clip(d, lo, hi)
        if asym:  # swap the roles of left and right for half of the samples
            flip = rng.random(len(idx)) < 0.5
            d[flip] = d[flip][:, MIRROR]
        deg[idx] = d
    # Right-side joints and the root's mirrored components: (x, y, z) -> (x, -y, -z) on the right.
    sign = np.ones((body.NUM_JOINTS, 3))
    for j in range(body.NUM_JOINTS):
        if body.side_of_joint(j) < 0:
            sign[j, 1:] = -1
    mats = _euler_to_matrix(deg * sign)
    aa = body.matrix_to_axis_angle(torch.as_tensor(mats)).numpy()
    return arch, deg, aa


# ---- Pose editing pairs and instructions (PoseFix-style), and parsing texts back to posecodes --
# An editing pair (A, B): B is the pose of A's split and archetype nearest to A (mean joint distance)
# among those that gain 1-4 posecodes over A (true of B, false of A); the instruction names exactly
# the gained posecodes, imperatively ("Raise the left hand above the head and bend the right knee."),
# each code in one of two wordings drawn per instruction, as the captions are. PoseFix (Delmas et al.
# 2023) pairs nearby AMASS poses and writes its modifiers from posecodes that change; here B is
# the nearest same-archetype pose whose posecodes change by a few. Codes that B loses are not named.

EDIT_VERSION = 1  # bump when pairing or instructions change: part of the edits' cache file name

def edit_pairs(split: PoseBenchSplit, max_codes: int = posecodes.EDIT_MAX_CODES) -> np.ndarray:
    """(N,) for each pose A of the split the index of its B (-1: none): the pose of A's archetype,
    other than A, nearest by mean joint distance (canonical joints) among those true of 1 to
    `max_codes` posecodes that are false of A. Deterministic: ties go to the lower index."""
    n = len(split)
    out = np.full(n, -1, np.int64)
    codes = split.codes.astype(np.int32)
    flat = split.joints.reshape(n, -1, 3).astype(np.float64)
    for a in np.unique(split.archetype):
        idx = np.flatnonzero(split.archetype == a)
        gained = (1 - codes[idx]) @ codes[idx].T  # (n_a, n_a): codes true of column, false of row
        ok = (gained >= 1) & (gained <= max_codes)
        np.fill_diagonal(ok, False)
        for r0 in range(0, len(idx), 64):  # (64, n_a) distances at a time
            rows = slice(r0, r0 + 64)
            d = np.linalg.norm(flat[idx[rows], None] - flat[None, idx], axis=-1).mean(-1)
            d[~ok[rows]] = np.inf
            best = np.argmin(d, axis=1)  # the first minimum: the lower index
            has = ok[rows].any(1)
            out[idx[rows][has]] = idx[best[has]]
    return out


@dataclass
class PoseEdits:
    """The editing pairs of one split. M pairs (the poses A that have a B), k instructions each."""
    source: np.ndarray     # (M,) index of A in the split
    target: np.ndarray     # (M,) index of B in the split
    codes: list            # M lists of the code names B gains over A (what every instruction names)
    instructions: list     # M lists of k str

    def __len__(self):
        return len(self.source)


def make_edits(split: PoseBenchSplit, k: int, seed: int) -> PoseEdits:
    """Pairs (`edit_pairs`) and k instructions per pair, the wording of each named code drawn from
    np.random.default_rng([seed, split index, 21]) in pair order, the codes in posecodes.CODE_NAMES order."""
    pairs = edit_pairs(split)
    src = np.flatnonzero(pairs >= 0)
    rng = np.random.default_rng([seed, SPLITS.index(split.name), 21])
    codes, texts = [], []
    for a in src:
        gained = [posecodes.CODE_NAMES[c] for c in np.flatnonzero(split.codes[pairs[a]] & ~split.codes[a])]
        codes.append(gained)
        wordings = [posecodes.EDIT_TEXT[c] for c in gained]
        texts.append([posecodes.join_clauses([w[int(rng.integers(len(w)))] for w in wordings])
                      for _ in range(k)])
    return PoseEdits(source=src, target=pairs[src], codes=codes, instructions=texts)


def load_edits(split: str, cfg: BenchConfig | None = None) -> PoseEdits:
    """`make_edits` of a split (k = cfg.captions_per_pose), cached beside the benchmark as
    <bench_dir>/<split>_edits_v<EDIT_VERSION>.json (written atomically)."""
    cfg = cfg or BenchConfig()
    path = os.path.join(build(cfg), f"{split}_edits_v{EDIT_VERSION}.json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                d = json.load(fh)
            return PoseEdits(np.asarray(d["source"], np.int64), np.asarray(d["target"], np.int64), d["codes"],
                             d["instructions"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable: made again below
    e = make_edits(load_split(split, cfg), cfg.captions_per_pose, cfg.seed)
    plumbing.atomic_write(path, lambda fh: json.dump({"source": e.source.tolist(), "target": e.target.tolist(),
                                                  "codes": e.codes, "instructions": e.instructions}, fh))
    return e


# ---- Abstract prompts (CoT-Pose, issue 22): the archetype as the whole prompt ------------------
# "Generate the pose of someone kneeling" names an action, not a posture: the answer must first say what
# such a body looks like (a caption, the reasoning) and then give a pose. Each archetype has three
# phrases; data.PROMPTS["abstract_to_pose"] paraphrases the request around them.

ARCHETYPE_PHRASES = {
    "standing": ["someone standing", "a person standing still", "a person who stands at rest"],
    "walking": ["someone walking", "a person taking a step while walking", "a person out for a walk"],
    "running": ["someone running", "a person running fast", "a runner in full stride"],
    "sitting": ["someone sitting", "a person sitting on a chair", "a seated person"],
    "squatting": ["someone squatting", "a person crouching in a deep squat", "a person squatting down"],
    "kneeling": ["someone kneeling", "a person kneeling on both knees", "a person down on the knees"],
    "kneeling_on_one_knee": ["someone kneeling on one knee", "a person down on one knee",
                             "a person proposing on one knee"],
    "lying_on_back": ["someone lying on the back", "a person lying face up", "a person resting on the back"],
    "lying_on_side": ["someone lying on the side", "a person lying sideways", "a person resting on one side"],
    "lying_on_front": ["someone lying on the stomach", "a person lying face down", "a person resting on the belly"],
    "bending_forward": ["someone bending forward", "a person bowing down", "a person leaning over to the front"],
    "arms_raised": ["someone raising both arms", "a person with both arms up", "a person cheering with arms up"],
    "t_pose": ["someone in a T-pose", "a person with the arms held out to the sides", "a person posing as a T"],
    "reaching_forward": ["someone reaching forward", "a person reaching out with one arm",
                         "a person grabbing something in front"],
    "kicking": ["someone kicking", "a person kicking a ball", "a person kicking forward with one leg"],
    "raising_one_hand": ["someone raising one hand", "a person raising a hand to ask a question",
                         "a person waving one hand up"],
    "lunging": ["someone lunging", "a person doing a forward lunge", "a person stepping into a lunge"],
    "clapping": ["someone clapping", "a person clapping the hands", "a person applauding"],
    "star_jump": ["someone doing a star jump", "a person in a jumping jack", "a person spreading arms and legs"],
}
assert set(ARCHETYPE_PHRASES) == set(ARCHETYPE_NAMES)
PLAUSIBLE_MIN = 0.1  # a posecode is plausible for an archetype when true of at least this share of its poses


def archetype_code_freq(split: "PoseBenchSplit") -> np.ndarray:
    """(A, C): for each archetype, the share of the split's poses of that archetype of which each
    posecode is true (0 for an archetype the split does not hold). Rewards use the training split's."""
    freq = np.zeros((len(ARCHETYPE_NAMES), len(posecodes.CODE_NAMES)))
    for a in range(len(ARCHETYPE_NAMES)):
        rows = split.codes[split.archetype == a]
        if len(rows):
            freq[a] = rows.mean(0)
    return freq


# ---- Building, caching, loading -------------------------------------------------------------

@dataclass
class PoseBenchSplit:
    """One split. Arrays are numpy; N poses, J = 24 joints, C posecodes."""
    name: str
    archetype: np.ndarray          # (N,) index into ARCHETYPE_NAMES
    pose_aa: np.ndarray            # (N, 24, 3) axis-angle, canonical global orientation (yaw 0)
    global_orient_view: np.ndarray  # (N, 3) axis-angle of the root in the camera's view frame
    joints: np.ndarray             # (N, 24, 3) canonical, pelvis-centred, metres
    joints_view: np.ndarray        # (N, 24, 3) in the view frame, pelvis-centred, metres
    camera: np.ndarray             # (N, 3) yaw_rad, elevation_rad, distance_m
    images: np.ndarray             # (N, H, W, 3) uint8 (memory-mapped)
    codes: np.ndarray              # (N, C) bool, columns posecodes.CODE_NAMES
    captions: list                 # N lists of str
    caption_codes: list            # N lists (one per caption) of lists of code names
    vqa: list                      # N lists of {question, answer, code, value}

    def __len__(self):
        return len(self.archetype)

    @property
    def archetype_names(self):
        return [ARCHETYPE_NAMES[a] for a in self.archetype]


def config_key(cfg: BenchConfig) -> str:
    """Cache key: the configuration, this file's version and the body model's identity."""
    d = dataclasses.asdict(cfg)
    if cfg.smpl_path:
        st = os.stat(cfg.smpl_path)
        d["smpl_identity"] = [os.path.abspath(cfg.smpl_path), st.st_size, int(st.st_mtime)]
    else:
        d["smpl_identity"] = f"procedural-v{body.PROCEDURAL_VERSION}"
    d["version"] = POSEBENCH_VERSION
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def bench_dir(cfg: BenchConfig) -> str:
    return os.path.join(plumbing.cache_dir(), "posebench", config_key(cfg))


def _validate(cfg: BenchConfig):
    for name in ("n_train", "n_val", "n_test"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.image_size < 16 or cfg.supersample < 1:
        raise ValueError(f"BenchConfig: image_size must be >= 16 and supersample >= 1, got "
                         f"{cfg.image_size} and {cfg.supersample}")
    lo, hi = cfg.distance_range_m
    if not 1.5 <= lo <= hi:
        raise ValueError(f"BenchConfig.distance_range_m must satisfy 1.5 <= low <= high, got {cfg.distance_range_m}")
    if cfg.smpl_path and not os.path.exists(cfg.smpl_path):
        raise FileNotFoundError(f"BenchConfig.smpl_path: {cfg.smpl_path} does not exist")


def _build_split(cfg: BenchConfig, split: str, n: int, model: body.BodyModel, progress) -> dict:
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])  # one stream per split
    arch, _, aa = sample_poses(n, rng)
    yaw = np.deg2rad(rng.uniform(-cfg.yaw_range_deg, cfg.yaw_range_deg, n))
    elev = np.deg2rad(rng.uniform(*cfg.elevation_range_deg, n))
    dist = rng.uniform(*cfg.distance_range_m, n)
    joints = np.zeros((n, body.NUM_JOINTS, 3), np.float32)
    joints_view = np.zeros_like(joints)
    go_view = np.zeros((n, 3), np.float32)
    images = np.zeros((n, cfg.image_size, cfg.image_size, 3), np.uint8)
    colours = face_colours(model)
    bs = 512
    for s in range(0, n, bs):
        sl = slice(s, min(n, s + bs))
        pose = torch.as_tensor(aa[sl], dtype=torch.float32)
        with torch.no_grad():
            out = model(pose[:, 0], pose[:, 1:])
        root = out.joints[:, :1]
        R = view_rotation(torch.as_tensor(yaw[sl], dtype=torch.float32), torch.as_tensor(elev[sl], dtype=torch.float32))
        j = out.joints - root
        joints[sl] = j.numpy()
        joints_view[sl] = (j @ R.transpose(1, 2)).numpy()
        go_view[sl] = body.matrix_to_axis_angle(R @ body.axis_angle_to_matrix(pose[:, 0])).numpy()
        verts = (out.vertices - root) @ R.transpose(1, 2)
        images[sl] = render(verts, torch.as_tensor(dist[sl], dtype=torch.float32), model.faces, colours,
                            cfg.image_size, cfg.supersample).numpy()
        progress.update(sl.stop - sl.start)
    codes = posecodes.posecodes(joints.astype(np.float64))
    captions, caption_codes = posecodes.make_captions(codes, cfg.captions_per_pose, rng)
    vqa = posecodes.make_vqa(codes, cfg.vqa_per_pose, rng)
    return dict(archetype=arch.astype(np.int16), pose_aa=aa.astype(np.float32), global_orient_view=go_view,
                joints=joints, joints_view=joints_view,
                camera=np.stack([yaw, elev, dist], 1).astype(np.float32), images=images, codes=codes,
                text=dict(captions=captions, caption_codes=caption_codes, vqa=vqa))


def build(cfg: BenchConfig, force: bool = False) -> str:
    """Build every split (if not cached) and return the cache directory. Written to a
    temporary directory first and renamed into place, so a crash leaves no half-built cache."""
    _validate(cfg)
    out = bench_dir(cfg)
    if os.path.exists(os.path.join(out, "meta.json")) and not force:
        return out
    from tqdm import tqdm

    t0 = time.time()
    model = body.BodyModel(cfg.smpl_path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".building-")
    try:
        total = cfg.n_train + cfg.n_val + cfg.n_test
        with tqdm(total=total, desc="posebench: render", unit="pose", disable=None) as bar:
            for split in SPLITS:
                d = _build_split(cfg, split, getattr(cfg, f"n_{split}"), model, bar)
                np.save(os.path.join(tmp, f"{split}_images.npy"), d.pop("images"))
                with open(os.path.join(tmp, f"{split}_text.json"), "w") as fh:
                    json.dump(d.pop("text"), fh)
                np.savez(os.path.join(tmp, f"{split}.npz"), **d)
        meta = {"config": dataclasses.asdict(cfg), "version": POSEBENCH_VERSION,
                "code_names": list(posecodes.CODE_NAMES),
                "archetype_names": list(ARCHETYPE_NAMES), "build_seconds": round(time.time() - t0, 1)}
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        if force and os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_split(split: str, cfg: BenchConfig | None = None, rebuild: bool = True) -> PoseBenchSplit:
    """Load one split of the benchmark for `cfg` (default configuration if None), building it
    first if it is not cached. A cache that does not read (truncated, corrupt) is built again,
    saying so (`rebuild`; else ValueError naming it)."""
    if split not in SPLITS:
        raise ValueError(f"load_split: unknown split {split!r}; expected one of {SPLITS}")
    cfg = cfg or BenchConfig()
    root = build(cfg)
    try:
        with np.load(os.path.join(root, f"{split}.npz")) as z:
            arrays = {k: z[k] for k in z.files}
        images = np.load(os.path.join(root, f"{split}_images.npy"), mmap_mode="r")
        with open(os.path.join(root, f"{split}_text.json")) as fh:
            text = json.load(fh)
        with open(os.path.join(root, "meta.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if not rebuild:
            raise ValueError(f"posebench cache {root} is unreadable ({e}); delete that directory to rebuild it") from e
        print(f"posebench cache {root} is unreadable ({type(e).__name__}: {e}); building it again")
        build(cfg, force=True)
        return load_split(split, cfg, rebuild=False)
    if meta["code_names"] != list(posecodes.CODE_NAMES) or meta["archetype_names"] != list(ARCHETYPE_NAMES):
        raise ValueError(f"posebench cache {root} was written by another version of posebench.py; "
                         "delete that directory to rebuild it")
    return PoseBenchSplit(name=split, images=images, captions=text["captions"],
                          caption_codes=text["caption_codes"], vqa=text["vqa"], **arrays)


# ---- Statistics and the preview -------------------------------------------------------------

def caption_ambiguity(split: PoseBenchSplit) -> np.ndarray:
    """For every caption of the split, the number of the split's poses satisfying all of its
    posecodes (>= 1: its own pose). Returns (N * captions_per_pose,) counts."""
    col = {c: i for i, c in enumerate(posecodes.CODE_NAMES)}
    req = np.zeros((sum(len(c) for c in split.caption_codes), len(posecodes.CODE_NAMES)), np.int32)
    r = 0
    for pose_codes in split.caption_codes:
        for used in pose_codes:
            req[r, [col[c] for c in used]] = 1
            r += 1
    violated = (~split.codes).astype(np.int32) @ req.T  # (N, captions): codes a pose fails
    return (violated == 0).sum(0)


def write_preview(split: PoseBenchSplit, path: str, n: int = 24, cols: int = 6) -> str:
    """A PNG contact sheet: renders with their archetype, first caption and one VQA pair."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(split))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.6))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(split.images[i], interpolation="nearest")
        qa = split.vqa[i][0]
        text = "\n".join(textwrap.wrap(split.captions[i][0], 30)) + "\n" + \
            "\n".join(textwrap.wrap(f"Q: {qa['question']} A: {qa['answer']}", 30))
        ax.set_title(ARCHETYPE_NAMES[split.archetype[i]], fontsize=8, fontweight="bold")
        ax.text(0.5, -0.02, text, transform=ax.transAxes, ha="center", va="top", fontsize=6)
    fig.suptitle(f"posebench {split.name} split: renders, automatic captions and VQA", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Args(BenchConfig):
    """Command-line arguments: the benchmark configuration plus what to do with it."""
    preview: str = field(default="results/posebench_preview.png",
                         metadata={"help": "where to write the PNG contact sheet ('' for none)"})
    force: bool = field(default=False, metadata={"help": "rebuild even if the cache holds this configuration"})


def main(argv=None):
    from transformers import HfArgumentParser

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    cached = os.path.exists(os.path.join(bench_dir(cfg), "meta.json")) and not args.force
    root = build(cfg, force=args.force)
    with open(os.path.join(root, "meta.json")) as fh:
        meta = json.load(fh)
    print(f"posebench: {root}")
    print(f"  build time {meta['build_seconds']:.1f} s" + (" (read from the cache now)" if cached else ""))
    print(f"  sizes: train {cfg.n_train}, val {cfg.n_val}, test {cfg.n_test}; images {cfg.image_size}x{cfg.image_size}")
    test = load_split("test", cfg)
    amb = caption_ambiguity(test)
    print(f"  caption ambiguity: a test caption fits {amb.mean():.1f} test poses on average "
          f"(median {np.median(amb):.0f}, {100 * amb.mean() / len(test):.1f} % of the split); "
          f"{100 * (amb == 1).mean():.1f} % of captions fit only their own pose")
    freq = test.codes.mean(0)
    shares = ", ".join(f"{c} {100 * f:.0f}%" for c, f in zip(posecodes.CODE_NAMES, freq))
    print(f"  posecode frequency (test): {shares}")
    if args.preview:
        print(f"  preview: {write_preview(test, args.preview)}")


if __name__ == "__main__":
    main()

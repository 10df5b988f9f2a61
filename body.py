"""The SMPL body: joints, rotations, a procedural SMPL-format model, and a chumpy-free converter.

Pose-RFT (§3.1) outputs SMPL pose parameters; every metric and reward is computed on the
24 SMPL joints they produce. This file speaks smplx's vocabulary (`global_orient`,
`body_pose`, `betas`, `joints`, `vertices`) and runs its forward pass through
`smplx.SMPL`'s ordinary code path, with either of two model files:

- the licensed `SMPL_NEUTRAL.pkl` (https://smpl.is.tue.mpg.de), given by path; or
- a procedural SMPL-format file built here, once, and cached: SMPL's 24-joint tree with
  its mean-shape rest joint offsets, a mannequin mesh of tubes around the bones (rigid
  skinning), a `J_regressor` that reproduces the rest joints exactly, 10 `shapedirs` that
  change body proportions, zero `posedirs`. It is what runs when no licensed file exists.

Evaluation joints (HMR2.0's 3DPW / Human3.6M protocol): the 14 LSP joints regressed from the
mesh by a user-supplied regressor, pelvis-aligned, errors in millimetres (`lsp14_from_vertices`,
`lsp14_mpjpe_mm`).

Rotations (batched, torch): axis-angle <-> matrix, and the continuous 6D representation of
Zhou et al., "On the Continuity of Rotation Representations in Neural Networks" (CVPR
2019): the first two columns of the matrix, mapped back by Gram-Schmidt. The pose action
of the model is 24 joints x 6D = 144 values, global orientation first.

Departures from SMPL, all in the procedural file only:
1. The mesh is a mannequin (about 1.5k vertices), not SMPL's 6890-vertex surface, so smplx's
   extra vertex keypoints (nose, toes, fingertips) come from this file's own `vertex_ids`.
2. Shape space: 10 hand-designed components (height, girth, leg/arm/torso length, ...),
   not SMPL's PCA basis; `posedirs` are zero (no pose-corrective blend shapes).
3. The pelvis rests at the origin (SMPL's sits about 0.22 m below it).

Run:
    python body.py convert SMPL_NEUTRAL.pkl OUT.pkl   # official pickle -> plain numpy
    python body.py build                              # (re)build the procedural file, print its path
    python body.py info PATH                          # what a model file holds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import plumbing

# ---- SMPL skeleton (smplx's names and order) ------------------------------------------------

SMPL_JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck",
    "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
NUM_JOINTS = 24  # J: global orientation + 23 body joints
NUM_BODY_JOINTS = 23
NUM_BETAS = 10
JOINT_INDEX = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}

# Offset of each joint from its parent in SMPL's neutral mean shape at rest, metres, SMPL's
# frame: +y up, +z forward (the body faces +z), +x to the body's left. These are the
# differences of `J_regressor @ v_template` of the neutral model along the tree, as published
# in the MIT-licensed skeleton constants of EDGE (Tseng et al., CVPR 2023, `vis.py`).
SMPL_REST_OFFSETS_M = np.array([
    [0.0, 0.0, 0.0],
    [0.05858135, -0.08228004, -0.01766408],
    [-0.06030973, -0.09051332, -0.01354254],
    [0.00443945, 0.12440352, -0.03838522],
    [0.04345142, -0.38646945, 0.008037],
    [-0.04325663, -0.38368791, -0.00484304],
    [0.00448844, 0.1379564, 0.02682033],
    [-0.01479032, -0.42687458, -0.037428],
    [0.01905555, -0.4200455, -0.03456167],
    [-0.00226458, 0.05603239, 0.00285505],
    [0.04105436, -0.06028581, 0.12204243],
    [-0.03483987, -0.06210566, 0.13032329],
    [-0.0133902, 0.21163553, -0.03346758],
    [0.07170245, 0.11399969, -0.01889817],
    [-0.08295366, 0.11247234, -0.02370739],
    [0.01011321, 0.08893734, 0.05040987],
    [0.12292141, 0.04520509, -0.019046],
    [-0.11322832, 0.04685326, -0.00847207],
    [0.2553319, -0.01564902, -0.02294649],
    [-0.26012748, -0.01436928, -0.03126873],
    [0.26570925, 0.01269811, -0.00737473],
    [-0.26910836, 0.00679372, -0.00602676],
    [0.08669055, -0.01063603, -0.01559429],
    [-0.0887537, -0.00865157, -0.01010708],
])


def rest_joints(offsets: np.ndarray = SMPL_REST_OFFSETS_M) -> np.ndarray:
    """Rest-pose joint positions (J, 3) in metres from parent offsets (pelvis at the origin)."""
    joints = np.zeros((NUM_JOINTS, 3))
    for j, p in enumerate(SMPL_PARENTS):
        joints[j] = offsets[j] if p < 0 else joints[p] + offsets[j]
    return joints


def side_of_joint(j: int) -> int:
    """+1 for the body's left, -1 for its right, 0 for the midline (used to colour renders)."""
    name = SMPL_JOINT_NAMES[j]
    return 1 if name.startswith("left") else -1 if name.startswith("right") else 0


# ---- Input checks ---------------------------------------------------------------------------

def check_tensor(x, name: str, trailing: tuple, fn: str) -> torch.Tensor:
    """Return `x` as a float tensor after checking it ends in `trailing` and is finite.

    Raises ValueError naming the function, the argument, the shape received and the one
    expected, instead of letting a shape error surface deep inside torch.
    """
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    want = "(..., " + ", ".join(str(d) for d in trailing) + ")"
    if x.dim() < len(trailing) or tuple(x.shape[-len(trailing):]) != tuple(trailing):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected {want}")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0] if x.dim() > len(trailing) else 1, -1).any(-1)
        raise ValueError(f"{fn}: {name} holds NaN or inf values (at batch rows "
                         f"{bad.nonzero().flatten()[:10].tolist()})")
    return x


# ---- Rotations (batched) --------------------------------------------------------------------

def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrix."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula. (..., 3) axis * angle_rad -> (..., 3, 3) rotation matrices.

    R = I + a K + b K^2 with K = skew(v), a = sin(t)/t, b = (1 - cos t)/t^2 (t = |v|), using
    Taylor series below t = 1e-3 so that values and gradients stay exact at t = 0.
    """
    v = check_tensor(axis_angle, "axis_angle", (3,), "axis_angle_to_matrix")
    t2 = (v * v).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = t2 < 1e-6
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t)) / (t * t))
    k = _skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions (w, x, y, z) with w >= 0.

    Shepperd's method: of the four candidate formulas, take the one whose divisor is largest,
    so no branch divides by a number near zero.
    """
    m = check_tensor(matrix, "matrix", (3, 3), "matrix_to_quaternion")
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 q_k^2 for k = w, x, y, z
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                      1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1).clamp_min(0)
    r = torch.sqrt(sq)  # 2 |q_k|
    # Row k: quaternion * 4 q_k, computed from the off-diagonal terms.
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s10, s02, s21 = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    cand = torch.stack([
        torch.stack([sq[..., 0], d21, d02, d10], -1),
        torch.stack([d21, sq[..., 1], s10, s02], -1),
        torch.stack([d02, s10, sq[..., 2], s21], -1),
        torch.stack([d10, s02, s21, sq[..., 3]], -1),
    ], dim=-2)  # (..., 4, 4)
    cand = cand / (2 * r.clamp_min(1e-8))[..., None]
    best = sq.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 3) axis * angle_rad with angle in [0, pi]."""
    q = matrix_to_quaternion(matrix)
    w, v = q[..., :1], q[..., 1:]
    s = v.norm(dim=-1, keepdim=True)  # sin(angle / 2)
    angle = 2 * torch.atan2(s, w)
    small = s < 1e-6
    # angle / sin(angle/2); its limit at 0 is 2 / cos(0) = 2 (series: 2 / w + s^2 / 3 ...).
    factor = torch.where(small, 2 / w.clamp_min(1e-8), angle / torch.where(small, torch.ones_like(s), s))
    return v * factor


def rot6d_to_matrix(rot6d: torch.Tensor) -> torch.Tensor:
    """Zhou et al. 2019: (..., 6) = two 3-vectors (the first two columns) -> (..., 3, 3).

    Gram-Schmidt: b1 = a1/|a1|, b2 = normalise(a2 - (b1.a2) b1), b3 = b1 x b2; R = [b1 b2 b3].
    """
    d = check_tensor(rot6d, "rot6d", (6,), "rot6d_to_matrix")
    a1, a2 = d[..., :3], d[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)  # columns


def matrix_to_rot6d(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns, concatenated."""
    m = check_tensor(matrix, "matrix", (3, 3), "matrix_to_rot6d")
    return torch.cat([m[..., :, 0], m[..., :, 1]], dim=-1)


def pose_to_matrices(pose: torch.Tensor, num_joints: int, name: str, fn: str) -> torch.Tensor:
    """Accept axis-angle, 6D or matrices for `num_joints` joints; return (B, num_joints, 3, 3).

    Accepted shapes: (B, n*3) or (B, n, 3) axis-angle; (B, n*6) or (B, n, 6) 6D;
    (B, n, 3, 3) matrices (n = num_joints; for n = 1 also (B, 3), (B, 6), (B, 3, 3)).
    """
    x = pose if torch.is_tensor(pose) else torch.as_tensor(np.asarray(pose), dtype=torch.float32)
    n = num_joints
    shape = tuple(x.shape)
    if x.dim() == 4 and shape[1:] == (n, 3, 3):
        return check_tensor(x, name, (n, 3, 3), fn)
    if n == 1 and x.dim() == 3 and shape[1:] == (3, 3):
        return check_tensor(x, name, (3, 3), fn)[:, None]
    if x.dim() == 2 and shape[1] in (3 * n, 6 * n):
        x = x.reshape(shape[0], n, shape[1] // n)
    if x.dim() == 3 and x.shape[1] == n and x.shape[2] == 3:
        return axis_angle_to_matrix(check_tensor(x, name, (n, 3), fn))
    if x.dim() == 3 and x.shape[1] == n and x.shape[2] == 6:
        return rot6d_to_matrix(check_tensor(x, name, (n, 6), fn))
    raise ValueError(
        f"{fn}: {name} has shape {shape}; expected axis-angle (B, {3 * n}) or (B, {n}, 3), "
        f"6D (B, {6 * n}) or (B, {n}, 6), or matrices (B, {n}, 3, 3)")


# ---- Alignment -----------------------------------------------------------------------------

def similarity_align(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Batched similarity Procrustes (Umeyama 1991): the alignment of PA-MPJPE. Differentiable;
    no input checks (metrics.procrustes_align validates, rewards.joint_distance_m too); use
    float64 (a 3x3 SVD).

    Args:
        p: Predicted joints, (N, J, 3) metres.
        g: Ground-truth joints, (N, J, 3) metres.

    Returns:
        s * R @ p + t minimising the summed squared distance to g, with R a proper
        rotation (det R = +1), (N, J, 3) metres.
    """
    mu_p = p.mean(dim=1, keepdim=True)  # (N, 1, 3)
    mu_g = g.mean(dim=1, keepdim=True)
    pc, gc = p - mu_p, g - mu_g  # (N, J, 3)
    var_p = pc.pow(2).sum(dim=(1, 2)) / p.shape[1]  # (N,) m^2
    cov = gc.transpose(1, 2) @ pc / p.shape[1]  # (N, 3, 3) = mean_j g_j p_j^T
    u, d, vh = torch.linalg.svd(cov)  # cov = U diag(d) Vh
    # Reflection fix: flip the last singular direction when U Vh would be a reflection.
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))  # (N,)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    fix = torch.ones_like(d)  # (N, 3)
    fix[:, -1] = sign
    rot = u @ (fix.unsqueeze(-1) * vh)  # (N, 3, 3) = U diag(fix) Vh
    # Degenerate pred (all joints at one point): var 0, trace 0 -> scale 0, aligned = mu_g.
    scale = (d * fix).sum(dim=1) / var_p.clamp_min(torch.finfo(p.dtype).tiny)  # (N,)
    return scale[:, None, None] * (pc @ rot.transpose(1, 2)) + mu_g


# ---- The procedural SMPL-format model -------------------------------------------------------

PROCEDURAL_VERSION = 1  # bump when the construction below changes: the cache key includes it
N_RING = 10             # vertices per cross-section ring
RING_T = (0.0, 0.25, 0.5, 0.75, 1.0)  # ring positions along a bone (0 = at the parent joint)
RING_TAPER = (0.8, 1.0, 1.0, 1.0, 0.8)

# Extra "end" segments for the leaf joints: offset from the joint (metres, rest frame).
LEAF_EXTENSIONS = {
    "head": (0.0, 0.20, 0.01), "left_foot": (0.0, -0.01, 0.06), "right_foot": (0.0, -0.01, 0.06),
    "left_hand": (0.09, -0.005, 0.0), "right_hand": (-0.09, -0.005, 0.0),
}
# Tube half-widths (side, front) in metres for the segment starting at a joint and heading to a
# child (or to the leaf extension). Keyed by (start joint, end joint or "end").
_RADII = {
    ("pelvis", "spine1"): (0.13, 0.10), ("pelvis", "left_hip"): (0.09, 0.09),
    ("pelvis", "right_hip"): (0.09, 0.09), ("spine1", "spine2"): (0.13, 0.10),
    ("spine2", "spine3"): (0.14, 0.10), ("spine3", "neck"): (0.12, 0.09),
    ("spine3", "left_collar"): (0.07, 0.07), ("spine3", "right_collar"): (0.07, 0.07),
    ("neck", "head"): (0.05, 0.05), ("head", "end"): (0.085, 0.10),
    ("left_collar", "left_shoulder"): (0.06, 0.06), ("right_collar", "right_shoulder"): (0.06, 0.06),
    ("left_hip", "left_knee"): (0.075, 0.075), ("right_hip", "right_knee"): (0.075, 0.075),
    ("left_knee", "left_ankle"): (0.05, 0.05), ("right_knee", "right_ankle"): (0.05, 0.05),
    ("left_ankle", "left_foot"): (0.04, 0.03), ("right_ankle", "right_foot"): (0.04, 0.03),
    ("left_foot", "end"): (0.04, 0.02), ("right_foot", "end"): (0.04, 0.02),
    ("left_shoulder", "left_elbow"): (0.045, 0.045), ("right_shoulder", "right_elbow"): (0.045, 0.045),
    ("left_elbow", "left_wrist"): (0.035, 0.035), ("right_elbow", "right_wrist"): (0.035, 0.035),
    ("left_wrist", "left_hand"): (0.03, 0.015), ("right_wrist", "right_hand"): (0.03, 0.015),
    ("left_hand", "end"): (0.03, 0.012), ("right_hand", "end"): (0.03, 0.012),
}
_LEGS = ("left_hip", "right_hip", "left_knee", "right_knee")
_ARMS = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist")
_TORSO = ("pelvis", "spine1", "spine2", "spine3")
# The 10 shape components. Each gives, per segment start joint, a relative change of the bone
# length ("len") and of the tube radius ("rad") per unit beta; "all" applies to every segment.
SHAPE_COMPONENTS = (
    ("height", {"len": {"all": 0.06}, "rad": {"all": 0.03}}),
    ("girth", {"rad": {"all": 0.15}}),
    ("leg_length", {"len": {j: 0.07 for j in _LEGS}}),
    ("arm_length", {"len": {j: 0.07 for j in _ARMS}}),
    ("torso_length", {"len": {j: 0.07 for j in _TORSO if j != "pelvis"} | {("pelvis", "spine1"): 0.07}}),
    ("shoulder_width", {"len": {"left_collar": 0.12, "right_collar": 0.12}}),
    ("hip_width", {"len": {("pelvis", "left_hip"): 0.12, ("pelvis", "right_hip"): 0.12},
                   "rad": {("pelvis", "spine1"): 0.08, ("pelvis", "left_hip"): 0.08, ("pelvis", "right_hip"): 0.08}}),
    ("head_size", {"len": {"neck": 0.08, "head": 0.10}, "rad": {"neck": 0.08, "head": 0.10}}),
    ("thigh_shin_ratio", {"len": {"left_hip": 0.08, "right_hip": 0.08, "left_knee": -0.08, "right_knee": -0.08}}),
    ("limb_thickness", {"rad": {j: 0.18 for j in _LEGS + _ARMS}}),
)


def _segments():
    """Bones as (start joint, end joint or -1 for a leaf extension) in a fixed order."""
    segs = []
    for j in range(NUM_JOINTS):
        children = [c for c, p in enumerate(SMPL_PARENTS) if p == j]
        segs += [(j, c) for c in children] or [(j, -1)]
    return segs


def _factor(table: dict, start: int, end: int) -> float:
    """Look a per-segment coefficient up by (start, end) names, start name, or "all"."""
    s = SMPL_JOINT_NAMES[start]
    e = "end" if end < 0 else SMPL_JOINT_NAMES[end]
    for key in ((s, e), s, "all"):
        if key in table:
            return table[key]
    return 0.0


def build_procedural_smpl() -> dict:
    """Build the procedural model as a dict of numpy arrays in the official pickle's layout.

    Every vertex is v = J_s + t (E - J_s) + r, on a tube ring at fraction t along a segment from
    joint s to its end E (a child joint or a leaf extension), with r a point of an ellipse
    around the bone axis. Shape changes joints (bone lengths) and radii linearly in beta, so
    shapedirs are exact; J_regressor averages the t = 0 ring of one segment per joint, whose
    ring offsets sum to zero, so J_regressor @ v equals the joints for every beta.
    """
    J0 = rest_joints()
    segs = _segments()
    ends = {j: J0[j] + np.array(LEAF_EXTENSIONS[SMPL_JOINT_NAMES[j]]) for j, e in segs if e < 0}

    # Per shape component: joint displacements dJ (24, 3) and leaf-end displacements.
    dJ = np.zeros((NUM_BETAS, NUM_JOINTS, 3))
    dE = {j: np.zeros((NUM_BETAS, 3)) for j in ends}
    for k, (_, comp) in enumerate(SHAPE_COMPONENTS):
        lens = comp.get("len", {})
        for j in range(1, NUM_JOINTS):  # parents precede children in SMPL's order
            p = SMPL_PARENTS[j]
            dJ[k, j] = dJ[k, p] + _factor(lens, p, j) * SMPL_REST_OFFSETS_M[j]
        for j in ends:
            dE[j][k] = dJ[k, j] + _factor(lens, j, -1) * (ends[j] - J0[j])

    verts, dirs, weights, faces, reg_ring = [], [], [], [], {}
    theta = 2 * np.pi * np.arange(N_RING) / N_RING
    for s, e in segs:
        a, b = J0[s], (J0[e] if e >= 0 else ends[s])
        da, db = dJ[:, s], (dJ[:, e] if e >= 0 else dE[s])  # (K, 3)
        axis = (b - a) / np.linalg.norm(b - a)
        ref = np.array([0.0, 0.0, 1.0]) if abs(axis[2]) < 0.8 else np.array([0.0, 1.0, 0.0])
        front = ref - ref.dot(axis) * axis
        front /= np.linalg.norm(front)
        side = np.cross(front, axis)
        rs, rf = _RADII[(SMPL_JOINT_NAMES[s], "end" if e < 0 else SMPL_JOINT_NAMES[e])]
        grow = np.array([_factor(c.get("rad", {}), s, e) for _, c in SHAPE_COMPONENTS])  # (K,)
        base = len(verts)
        for t, taper in zip(RING_T, RING_TAPER):
            for th in theta:
                r = taper * (rs * np.cos(th) * side + rf * np.sin(th) * front)
                verts.append(a + t * (b - a) + r)
                dirs.append((1 - t) * da + t * db + grow[:, None] * r)  # (K, 3): d v / d beta_k
        reg_ring.setdefault(s, list(range(base, base + N_RING)))
        # Caps: one apex beyond each end, pushed out by the end ring's radius.
        cap = 0.6 * min(rs, rf)
        for t, sign in ((0.0, -1.0), (1.0, 1.0)):
            verts.append(a + t * (b - a) + sign * cap * axis)
            dirs.append((1 - t) * da + t * db + grow[:, None] * sign * cap * axis)
        weights += [s] * (len(RING_T) * N_RING + 2)
        n_r = len(RING_T)
        for i in range(n_r - 1):
            for k in range(N_RING):
                v00 = base + i * N_RING + k
                v01 = base + i * N_RING + (k + 1) % N_RING
                v10, v11 = v00 + N_RING, v01 + N_RING
                faces += [(v00, v10, v11), (v00, v11, v01)]
        apex0, apex1 = base + n_r * N_RING, base + n_r * N_RING + 1
        last = base + (n_r - 1) * N_RING
        for k in range(N_RING):
            faces.append((apex0, base + k, base + (k + 1) % N_RING))
            faces.append((apex1, last + (k + 1) % N_RING, last + k))

    v = np.array(verts)
    f = np.array(faces, dtype=np.int64)
    # Orient every face outwards (normal along centroid minus the segment's mid-axis point).
    seg_of_vertex = np.repeat(np.arange(len(segs)), len(RING_T) * N_RING + 2)
    mids = np.array([(J0[s] + (J0[e] if e >= 0 else ends[s])) / 2 for s, e in segs])
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = tri.mean(1) - mids[seg_of_vertex[f[:, 0]]]
    flip = (normal * outward).sum(1) < 0
    f[flip] = f[flip][:, [0, 2, 1]]

    V = len(v)
    lbs = np.zeros((V, NUM_JOINTS))
    lbs[np.arange(V), weights] = 1.0
    reg = np.zeros((NUM_JOINTS, V))
    for j, ring in reg_ring.items():
        reg[j, ring] = 1.0 / N_RING
    kintree = np.array([[2 ** 32 - 1] + list(SMPL_PARENTS[1:]), list(range(NUM_JOINTS))], dtype=np.int64)
    return {
        "v_template": v,
        "shapedirs": np.transpose(np.array(dirs), (0, 2, 1)),  # (V, 3, K)
        "posedirs": np.zeros((V, 3, 9 * NUM_BODY_JOINTS)),
        "J_regressor": reg,
        "weights": lbs,
        "kintree_table": kintree,
        "f": f,
        "J": J0,
        "vertex_ids": _keypoint_vertices(v, np.array(weights)),
        "shape_component_names": [n for n, _ in SHAPE_COMPONENTS],
        "procedural_version": PROCEDURAL_VERSION,
    }


def _keypoint_vertices(v: np.ndarray, joint_of_vertex: np.ndarray) -> dict:
    """smplx's extra keypoints (face, feet, fingertips) as the nearest vertex to a target point."""
    J = rest_joints()
    head, lf, rf = J[JOINT_INDEX["head"]], J[JOINT_INDEX["left_foot"]], J[JOINT_INDEX["right_foot"]]
    la, ra = J[JOINT_INDEX["left_ankle"]], J[JOINT_INDEX["right_ankle"]]
    lh, rh = J[JOINT_INDEX["left_hand"]], J[JOINT_INDEX["right_hand"]]
    targets = {
        "nose": head + [0, 0.06, 0.12], "reye": head + [-0.03, 0.09, 0.1], "leye": head + [0.03, 0.09, 0.1],
        "rear": head + [-0.09, 0.07, 0.0], "lear": head + [0.09, 0.07, 0.0],
        "LBigToe": lf + [-0.02, 0, 0.08], "LSmallToe": lf + [0.03, 0, 0.08], "LHeel": la + [0, -0.03, -0.05],
        "RBigToe": rf + [0.02, 0, 0.08], "RSmallToe": rf + [-0.03, 0, 0.08], "RHeel": ra + [0, -0.03, -0.05],
    }
    for side, hand, sign in (("l", lh, 1), ("r", rh, -1)):
        for i, tip in enumerate(("thumb", "index", "middle", "ring", "pinky")):
            targets[side + tip] = hand + [sign * 0.1, 0, 0.02 - 0.01 * i]
    return {k: int(np.argmin(((v - np.asarray(t)) ** 2).sum(1))) for k, t in targets.items()}


def procedural_smpl_path(rebuild: bool = False) -> str:
    """Path of the procedural model file, built on first use and cached."""
    path = os.path.join(plumbing.cache_dir(), "body", f"procedural_smpl_v{PROCEDURAL_VERSION}.pkl")
    if rebuild or not os.path.exists(path):
        plumbing.atomic_pickle(build_procedural_smpl(), path)
    return path


# ---- The official file, read without chumpy -------------------------------------------------

from smpl_pickle import convert_smpl_pickle, load_smpl_pickle  # noqa: E402  (see smpl_pickle.py)


# ---- The body model -------------------------------------------------------------------------

@dataclass
class BodyOutput:
    """SMPL forward output. joints: (B, 24, 3) metres; vertices: (B, V, 3) metres."""
    joints: torch.Tensor
    vertices: torch.Tensor


class BodyModel(torch.nn.Module):
    """SMPL through `smplx.SMPL`, on the procedural model by default or a licensed file by path.

    Args:
        smpl_path: an SMPL model pickle (the official one, chumpy inside or not, or one written
            by `python body.py convert`). None: the procedural model (built once, cached).
    """

    def __init__(self, smpl_path: str | None = None):
        super().__init__()
        import smplx
        from smplx.utils import Struct

        self.smpl_path = smpl_path or procedural_smpl_path()
        data = load_smpl_pickle(self.smpl_path)
        vertex_ids = data.pop("vertex_ids", None)  # None: smplx's own ids for SMPL's 6890-vertex mesh
        if vertex_ids is None and data["v_template"].shape[0] != 6890:
            raise ValueError(f"{self.smpl_path}: a {data['v_template'].shape[0]}-vertex model needs a "
                             "'vertex_ids' entry (smplx's keypoint vertices are for SMPL's 6890)")
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a warning for 10 betas
            self.smpl = smplx.SMPL(model_path=self.smpl_path, data_struct=Struct(**data),
                                   vertex_ids=vertex_ids, num_betas=NUM_BETAS, create_betas=False,
                                   create_global_orient=False, create_body_pose=False, create_transl=False)
        self.register_buffer("faces", torch.as_tensor(np.asarray(data["f"], dtype=np.int64)))
        # The joint that moves each vertex most: colours renders by body part and side.
        self.register_buffer("vertex_joint", torch.as_tensor(np.asarray(data["weights"]).argmax(1)))
        self.register_buffer("rest_joints", (self.smpl.J_regressor @ self.smpl.v_template)[None], persistent=False)

    @property
    def num_vertices(self) -> int:
        return int(self.smpl.v_template.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are: its inputs must be there too."""
        return self.smpl.v_template.device

    def forward(self, global_orient, body_pose, betas=None) -> BodyOutput:
        """Pose the body.

        Args:
            global_orient: (B, 3) axis-angle, (B, 6) 6D or (B, 3, 3) / (B, 1, 3, 3) matrix.
            body_pose: (B, 69) / (B, 23, 3) axis-angle, (B, 138) / (B, 23, 6) 6D or (B, 23, 3, 3).
            betas: (B, 10) shape coefficients, or None for the mean shape.
        Returns:
            BodyOutput with joints (B, 24, 3) and vertices (B, V, 3), metres, pelvis at rest position.
        """
        go = pose_to_matrices(global_orient, 1, "global_orient", "BodyModel.forward")
        bp = pose_to_matrices(body_pose, NUM_BODY_JOINTS, "body_pose", "BodyModel.forward")
        if go.shape[0] != bp.shape[0]:
            raise ValueError(f"BodyModel.forward: global_orient has batch {go.shape[0]} but body_pose "
                             f"has batch {bp.shape[0]}")
        B = go.shape[0]
        dtype = self.smpl.v_template.dtype
        if betas is None:
            betas = torch.zeros(B, NUM_BETAS, dtype=dtype, device=go.device)
        else:
            betas = check_tensor(betas, "betas", (NUM_BETAS,), "BodyModel.forward")
            if betas.dim() != 2 or betas.shape[0] != B:
                raise ValueError(f"BodyModel.forward: betas has shape {tuple(betas.shape)}, "
                                 f"expected ({B}, {NUM_BETAS})")
        out = self.smpl(global_orient=go.to(dtype), body_pose=bp.to(dtype), betas=betas.to(dtype), pose2rot=False)
        return BodyOutput(joints=out.joints[:, :NUM_JOINTS], vertices=out.vertices)

    def joints_rot6d(self, pose6d: torch.Tensor) -> torch.Tensor:
        """(B, 24, 3) joints of the mean shape from 6D poses (B, 144), as `forward_rot6d(...).joints`,
        through the kinematic tree alone (no mesh: a joint-space loss costs a small fraction of it)."""
        from smplx.lbs import batch_rigid_transform

        p = check_tensor(pose6d, "pose6d", (6 * NUM_JOINTS,), "BodyModel.joints_rot6d")
        rot = rot6d_to_matrix(p.reshape(p.shape[0], NUM_JOINTS, 6)).to(self.smpl.v_template.dtype)
        rest = self.rest_joints.expand(len(rot), -1, -1)
        return batch_rigid_transform(rot, rest, self.smpl.parents, dtype=rot.dtype)[0]

    def forward_rot6d(self, pose6d: torch.Tensor, betas=None) -> BodyOutput:
        """Pose from the model's action p: (B, 144) or (B, 24, 6), global orientation first."""
        p = check_tensor(pose6d, "pose6d", (6 * NUM_JOINTS,), "BodyModel.forward_rot6d") if pose6d.dim() == 2 \
            else check_tensor(pose6d, "pose6d", (NUM_JOINTS, 6), "BodyModel.forward_rot6d")
        p = p.reshape(p.shape[0], NUM_JOINTS, 6)
        return self(p[:, 0], p[:, 1:], betas)


# ---- CLI ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="official SMPL pickle (chumpy inside) -> plain-numpy pickle")
    c.add_argument("src", help="e.g. SMPL_NEUTRAL.pkl or basicModel_neutral_lbs_10_207_0_v1.0.0.pkl")
    c.add_argument("dst", help="output pickle; loads with smplx.SMPL(model_path=dst) and no chumpy")
    b = sub.add_parser("build", help="(re)build the procedural model file and print its path")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    i = sub.add_parser("info", help="print what a model file holds")
    i.add_argument("path", nargs="?", default=None, help="model pickle (default: the procedural one)")
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        summary = convert_smpl_pickle(args.src, args.dst)
        print(f"wrote {args.dst}: {summary}")
    elif args.cmd == "build":
        print(procedural_smpl_path(rebuild=args.force))
    else:
        path = args.path or procedural_smpl_path()
        for k, val in load_smpl_pickle(path).items():
            print(f"{k:24s} {getattr(val, 'shape', type(val).__name__)}")


if __name__ == "__main__":
    main()

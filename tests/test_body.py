"""body.py against slow, obviously correct references: a matrix exponential, a loop over the
kinematic tree, and the model file's own arrays multiplied out in numpy."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import body
import plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return body.BodyModel()


def random_axis_angle(n, max_angle, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    return axis * torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle


def slow_fk(pose_aa: np.ndarray) -> np.ndarray:
    """Forward kinematics by a loop over the tree: R_j = R_parent @ R_local,
    p_j = p_parent + R_parent @ offset_j. pose_aa: (24, 3) -> joints (24, 3)."""
    from scipy.spatial.transform import Rotation

    R = [None] * body.NUM_JOINTS
    p = np.zeros((body.NUM_JOINTS, 3))
    for j, parent in enumerate(body.SMPL_PARENTS):
        local = Rotation.from_rotvec(pose_aa[j]).as_matrix()
        if parent < 0:
            R[j], p[j] = local, body.SMPL_REST_OFFSETS_M[j]
        else:
            R[j] = R[parent] @ local
            p[j] = p[parent] + R[parent] @ body.SMPL_REST_OFFSETS_M[j]
    return p


# ---- rotations ------------------------------------------------------------------------------

def test_axis_angle_to_matrix_equals_matrix_exponential():
    aa = random_axis_angle(500, 3.1)
    ref = torch.linalg.matrix_exp(body._skew(aa))  # exp of the cross-product matrix
    assert torch.allclose(body.axis_angle_to_matrix(aa), ref, atol=1e-10)
    tiny = aa * 1e-5  # the Taylor branch
    assert torch.allclose(body.axis_angle_to_matrix(tiny), torch.linalg.matrix_exp(body._skew(tiny)), atol=1e-14)


def test_axis_angle_round_trip_including_near_zero_and_near_pi():
    for max_angle in (1e-7, 1e-3, 1.0, 3.0, np.pi - 1e-3):
        aa = random_axis_angle(300, max_angle, seed=1)
        back = body.matrix_to_axis_angle(body.axis_angle_to_matrix(aa))
        assert (back - aa).abs().max() < 1e-5, max_angle
    # At exactly pi the axis sign is ambiguous: compare rotations instead.
    aa = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=-1) * np.pi
    R = body.axis_angle_to_matrix(aa)
    assert (body.axis_angle_to_matrix(body.matrix_to_axis_angle(R)) - R).abs().max() < 1e-5


def test_matrix_to_axis_angle_matches_trace_formula():
    aa = random_axis_angle(200, 2.5, seed=2)
    R = body.axis_angle_to_matrix(aa).numpy()
    for i in range(len(R)):  # angle from the trace, axis from the skew part
        angle = np.arccos((np.trace(R[i]) - 1) / 2)
        axis = np.array([R[i, 2, 1] - R[i, 1, 2], R[i, 0, 2] - R[i, 2, 0], R[i, 1, 0] - R[i, 0, 1]])
        axis /= 2 * np.sin(angle)
        assert np.allclose(body.matrix_to_axis_angle(torch.as_tensor(R[i]))[None].numpy(), axis * angle, atol=1e-6)


def test_rot6d_round_trip_and_gram_schmidt():
    R = body.axis_angle_to_matrix(random_axis_angle(300, 3.1, seed=3))
    assert (body.rot6d_to_matrix(body.matrix_to_rot6d(R)) - R).abs().max() < 1e-5
    d6 = torch.randn(300, 6, dtype=torch.float64)  # any 6 numbers map to a rotation
    M = body.rot6d_to_matrix(d6)
    assert torch.allclose(M @ M.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(M), atol=1e-10)
    assert torch.allclose(torch.det(M), torch.ones(300, dtype=torch.float64), atol=1e-10)
    # First column is a1 normalised; second lies in the plane of a1, a2 (Zhou et al. 2019).
    assert torch.allclose(M[..., 0], torch.nn.functional.normalize(d6[:, :3], dim=-1), atol=1e-10)
    assert torch.allclose((torch.cross(d6[:, :3], d6[:, 3:], dim=-1) * M[..., 1]).sum(-1),
                          torch.zeros(300, dtype=torch.float64), atol=1e-10)


def test_rotation_gradients_finite_at_zero():
    aa = torch.zeros(4, 3, requires_grad=True)
    body.axis_angle_to_matrix(aa).sum().backward()
    assert torch.isfinite(aa.grad).all()


# ---- the procedural model file --------------------------------------------------------------

def test_procedural_file_is_small_and_consistent():
    d = body.build_procedural_smpl()
    V = d["v_template"].shape[0]
    assert 500 < V <= 5000
    assert d["shapedirs"].shape == (V, 3, 10) and d["posedirs"].shape == (V, 3, 207)
    assert np.allclose(d["weights"].sum(1), 1) and np.allclose(d["J_regressor"].sum(1), 1)
    assert not d["posedirs"].any()
    # J_regressor reproduces the rest joints, for the mean shape and for random shapes.
    assert np.abs(d["J_regressor"] @ d["v_template"] - body.rest_joints()).max() < 1e-12
    tri = d["v_template"][d["f"]]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (np.linalg.norm(normal, axis=1) > 0).all()  # no degenerate faces


def test_rest_pose_joints_equal_rest_joints(model):
    out = model(torch.zeros(1, 3), torch.zeros(1, 69))
    assert (out.joints[0].double() - torch.as_tensor(body.rest_joints())).abs().max() < 1e-5


def test_loads_through_plain_smplx():
    import smplx

    path = body.procedural_smpl_path()
    with open(path, "rb") as fh:
        vertex_ids = pickle.load(fh)["vertex_ids"]
    smpl = smplx.SMPL(model_path=path, vertex_ids=vertex_ids)
    out = smpl(body_pose=torch.zeros(1, 69), global_orient=torch.zeros(1, 3))
    assert (out.joints[0, :24].double() - torch.as_tensor(body.rest_joints())).abs().max() < 1e-5


def test_forward_kinematics_against_a_loop(model):
    aa = random_axis_angle(24 * 6, 1.5, seed=4).reshape(6, 24, 3).float()
    out = model(aa[:, 0], aa[:, 1:])
    for i in range(6):
        assert np.abs(out.joints[i].numpy() - slow_fk(aa[i].double().numpy())).max() < 1e-5


def test_shape_space_moves_joints_as_the_file_says(model):
    d = body.build_procedural_smpl()
    betas = torch.randn(3, 10)
    out = model(torch.zeros(3, 3), torch.zeros(3, 69), betas)
    for i in range(3):
        v = d["v_template"] + d["shapedirs"] @ betas[i].double().numpy()
        assert np.abs(out.joints[i].numpy() - d["J_regressor"] @ v).max() < 1e-5
        assert np.abs(out.vertices[i].numpy() - v).max() < 1e-5
    # Component 0 is height: one unit changes head-to-ankle height by about 6 %.
    b = torch.zeros(2, 10)
    b[1, 0] = 1.0
    j = model(torch.zeros(2, 3), torch.zeros(2, 69), b).joints
    h = j[:, body.JOINT_INDEX["head"], 1] - j[:, body.JOINT_INDEX["left_ankle"], 1]
    assert 1.04 < (h[1] / h[0]).item() < 1.08


def test_bending_left_elbow_moves_only_left_forearm_and_hand(model):
    rest = model(torch.zeros(1, 3), torch.zeros(1, 69))
    bp = torch.zeros(1, 23, 3)
    bp[0, body.JOINT_INDEX["left_elbow"] - 1] = torch.tensor([0.3, -1.2, 0.0])
    bent = model(torch.zeros(1, 3), bp)
    moved_joints = ((bent.joints - rest.joints).norm(dim=-1)[0] > 1e-6).nonzero().flatten().tolist()
    assert moved_joints == [body.JOINT_INDEX["left_wrist"], body.JOINT_INDEX["left_hand"]]
    moved_vertices = (bent.vertices - rest.vertices).norm(dim=-1)[0] > 1e-6
    parts = set(model.vertex_joint[moved_vertices].tolist())
    assert parts == {body.JOINT_INDEX[n] for n in ("left_elbow", "left_wrist", "left_hand")}


def test_pose_formats_agree(model):
    aa = random_axis_angle(24 * 4, 2.0, seed=5).reshape(4, 24, 3).float()
    R = body.axis_angle_to_matrix(aa)
    d6 = body.matrix_to_rot6d(R)
    ref = model(aa[:, 0], aa[:, 1:].reshape(4, 69)).joints
    for go, bp in ((d6[:, 0], d6[:, 1:]), (R[:, 0], R[:, 1:]), (R[:, :1], d6[:, 1:].reshape(4, -1))):
        assert (model(go, bp).joints - ref).abs().max() < 1e-5
    assert (model.forward_rot6d(d6.reshape(4, 144)).joints - ref).abs().max() < 1e-5


def test_joints_through_the_tree_alone_equal_the_full_forward(model):
    """joints_rot6d (the kinematic tree, no mesh) gives forward_rot6d's joints and their gradients."""
    aa = random_axis_angle(24 * 4, 2.0, seed=6).reshape(4, 24, 3).float()
    d6 = body.matrix_to_rot6d(body.axis_angle_to_matrix(aa)).reshape(4, 144)
    w = torch.randn(4, 24, 3, generator=torch.Generator().manual_seed(0))
    a, b = d6.clone().requires_grad_(), d6.clone().requires_grad_()
    ja, jb = model.forward_rot6d(a).joints, model.joints_rot6d(b)
    assert (ja - jb).abs().max() < 1e-6
    (ja * w).sum().backward()
    (jb * w).sum().backward()
    assert (a.grad - b.grad).abs().max() < 1e-5


# ---- bad input ------------------------------------------------------------------------------

def test_bad_shapes_and_nan_are_named(model):
    with pytest.raises(ValueError, match="body_pose has shape \\(2, 22, 3\\)"):
        model(torch.zeros(2, 3), torch.zeros(2, 22, 3))
    with pytest.raises(ValueError, match="global_orient has shape \\(2, 4\\)"):
        model(torch.zeros(2, 4), torch.zeros(2, 69))
    with pytest.raises(ValueError, match="batch 3 but body_pose has batch 2"):
        model(torch.zeros(3, 3), torch.zeros(2, 69))
    bad = torch.zeros(2, 69)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="body_pose holds NaN"):
        model(torch.zeros(2, 3), bad)
    with pytest.raises(ValueError, match="betas has shape"):
        model(torch.zeros(2, 3), torch.zeros(2, 69), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="rot6d has shape"):
        body.rot6d_to_matrix(torch.zeros(5, 5))


def test_missing_and_malformed_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="smpl.is.tue.mpg.de"):
        body.BodyModel(str(tmp_path / "SMPL_NEUTRAL.pkl"))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="junk.pkl"):
        body.BodyModel(str(junk))
    d = body.build_procedural_smpl()
    d["J_regressor"] = d["J_regressor"][:20]
    broken = tmp_path / "broken.pkl"
    plumbing.atomic_pickle(d, str(broken))
    with pytest.raises(ValueError, match="J_regressor"):
        body.BodyModel(str(broken))


def test_cli_convert_and_info(tmp_path):
    env = dict(os.environ)
    src = body.procedural_smpl_path()
    dst = tmp_path / "converted.pkl"
    r = subprocess.run([sys.executable, "body.py", "convert", src, str(dst)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "body.py", "info", str(dst)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "J_regressor" in r.stdout, r.stderr


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "a.json"
    plumbing.atomic_write(str(path), lambda fh: fh.write("old"))
    assert path.read_text() == "old"

    def broken(fh):
        fh.write("half of the new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        plumbing.atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.json"]  # no temporary file left
    umask = os.umask(0o022)
    try:
        plumbing.atomic_write(str(path), lambda fh: fh.write(b"new"), binary=True)
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o644  # the usual mode, not 0600

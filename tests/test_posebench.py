"""posebench.py: determinism, splits, captions and VQA against a slow per-pose reference, the
stored frames and images, the cache, and bad input (the renderer: tests/test_render.py)."""
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import body
import posebench
import posecodes
import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = posebench.BenchConfig(n_train=48, n_val=16, n_test=40, image_size=32)


@pytest.fixture(scope="module")
def splits():
    return {s: posebench.load_split(s, TINY) for s in posebench.SPLITS}


def slow_codes(J: np.ndarray) -> set:
    """The posecodes of one pose (24, 3), written out one statement at a time with math."""
    t = posecodes.THRESH
    P = {n: J[i] for i, n in enumerate(body.SMPL_JOINT_NAMES)}

    def dist(a, b):
        return math.dist(P[a], P[b])

    def angle(a, b, c):
        u, v = P[a] - P[b], P[c] - P[b]
        return math.degrees(math.acos(max(-1.0, min(1.0, u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))))

    spine = (P["neck"] - P["pelvis"]) / np.linalg.norm(P["neck"] - P["pelvis"])
    tilt = math.degrees(math.acos(max(-1.0, min(1.0, spine[1]))))
    across = (P["left_hip"] - P["right_hip"]) / np.linalg.norm(P["left_hip"] - P["right_hip"])
    facing = np.cross(across, spine)  # left x up = forward
    upright, lying = tilt < t["upright_deg"], tilt > t["lying_deg"]
    codes = set()
    if upright:
        codes.add("upright")
    if lying:
        codes.add("lying")
        if facing[1] > 0.7:
            codes.add("lying_on_back")
        if facing[1] < -0.7:
            codes.add("lying_on_front")
        if abs(across[1]) > 0.7:
            codes.add("lying_on_side")
    if not upright and not lying:
        codes.add("leaning_forward" if spine[2] > 0 else "leaning_backward")
    if dist("left_wrist", "right_wrist") < t["hands_together_m"]:
        codes.add("hands_together")
    if dist("left_wrist", "right_wrist") > t["hands_apart_m"]:
        codes.add("hands_apart")
    if dist("left_ankle", "right_ankle") < t["feet_together_m"]:
        codes.add("feet_together")
    if dist("left_ankle", "right_ankle") > t["feet_apart_m"]:
        codes.add("feet_apart")
    if not lying and P["pelvis"][1] - min(P["left_ankle"][1], P["right_ankle"][1]) < t["hips_low_m"]:
        codes.add("hips_low")
    for s, o in (("left", "right"), ("right", "left")):
        elbow = angle(f"{s}_shoulder", f"{s}_elbow", f"{s}_wrist")
        knee = angle(f"{s}_hip", f"{s}_knee", f"{s}_ankle")
        checks = {
            "elbow_bent": elbow < t["elbow_bent_deg"], "elbow_straight": elbow > t["elbow_straight_deg"],
            "knee_bent": knee < t["knee_bent_deg"], "knee_straight": knee > t["knee_straight_deg"],
            "hand_above_head": P[f"{s}_wrist"][1] > P["head"][1] + t["above_head_m"],
            "hand_raised": P[f"{s}_wrist"][1] > P[f"{s}_shoulder"][1] + t["raised_m"],
            "arm_forward": P[f"{s}_wrist"][2] - P[f"{s}_shoulder"][2] > t["forward_m"],
            "hand_behind": upright and P[f"{s}_wrist"][2] < P["pelvis"][2] - t["behind_m"],
            "knee_raised": not lying and P[f"{s}_knee"][1] > P[f"{s}_hip"][1] - t["knee_raised_m"],
            "foot_raised": not lying and P[f"{s}_ankle"][1] > P[f"{o}_ankle"][1] + t["foot_raised_m"],
        }
        codes |= {f"{s}_{k}" for k, v in checks.items() if v}
    return codes


def test_posecodes_match_slow_reference(splits):
    test = splits["test"]
    for i in range(len(test)):
        fast = {c for c, v in zip(posecodes.CODE_NAMES, test.codes[i]) if v}
        assert fast == slow_codes(test.joints[i].astype(np.float64)), i


def test_every_caption_and_vqa_answer_holds_for_its_pose(splits):
    for split in splits.values():
        for i in range(len(split)):
            truth = slow_codes(split.joints[i].astype(np.float64))
            assert len(split.captions[i]) == TINY.captions_per_pose
            for text, used in zip(split.captions[i], split.caption_codes[i]):
                assert set(used) <= truth, (split.name, i, text)
                for c in used:  # the caption says each of its posecodes, in one of its phrasings
                    assert any(v.lower() in text.lower() for v in posecodes.CODE_TEXT[c][0]), (text, c)
            for qa in split.vqa[i]:
                assert qa["value"] == (qa["code"] in truth)
                assert qa["answer"].startswith("Yes" if qa["value"] else "No")


def test_captions_are_ambiguous_but_fit_their_own_pose(splits):
    amb = posebench.caption_ambiguity(splits["test"])
    assert (amb >= 1).all()
    assert amb.mean() > 2  # a caption fits several poses: the benchmark keeps the one-to-many difficulty


def test_sampled_poses_respect_limits_and_mirroring():
    rng = np.random.default_rng(0)
    arch, deg, aa = posebench.sample_poses(2000, rng)
    for j in range(body.NUM_JOINTS):
        lim = np.array(posebench.LIMITS_DEG[posebench._left_name(j)])
        assert (deg[:, j] >= lim[:, 0] - 1e-9).all() and (deg[:, j] <= lim[:, 1] + 1e-9).all(), j
    assert (deg[:, 0, 1] == 0).all()  # canonical yaw
    assert set(np.unique(arch)) == set(range(len(posebench.ARCHETYPES)))
    # Stored axis-angle equals the Euler angles composed in the documented order and mirroring.
    sign = np.array([[1, -1, -1] if body.side_of_joint(j) < 0 else [1, 1, 1] for j in range(24)])
    R = posebench._euler_to_matrix(deg[:5] * sign)
    assert np.abs(body.axis_angle_to_matrix(torch.as_tensor(aa[:5])).numpy() - R).max() < 1e-9
    # A symmetric archetype's mean pose is mirror-symmetric in joint positions.
    model = body.BodyModel()
    mean = np.zeros((1, 24, 3))
    for name, v in posebench.ARCHETYPES["arms_raised"][0].items():
        mean[0, body.JOINT_INDEX[name]] = v
    rot = torch.as_tensor(posebench._euler_to_matrix(mean * sign), dtype=torch.float32)
    j = model(rot[:, 0], rot[:, 1:]).joints[0].numpy()
    lw, rw = j[body.JOINT_INDEX["left_wrist"]], j[body.JOINT_INDEX["right_wrist"]]
    assert abs(lw[0] + rw[0]) < 0.03 and abs(lw[1] - rw[1]) < 0.03  # mirror images (rest skeleton is nearly symmetric)


def test_stored_frames_are_consistent(splits):
    model = body.BodyModel()
    s = splits["val"]
    pose = torch.as_tensor(s.pose_aa)
    out = model(pose[:, 0], pose[:, 1:])
    assert np.abs((out.joints - out.joints[:, :1]).numpy() - s.joints).max() < 1e-5
    view = model(torch.as_tensor(s.global_orient_view), pose[:, 1:])
    assert np.abs((view.joints - view.joints[:, :1]).numpy() - s.joints_view).max() < 1e-5
    R = render.view_rotation(torch.as_tensor(s.camera[:, 0]), torch.as_tensor(s.camera[:, 1]))
    assert np.abs(s.joints @ R.numpy().transpose(0, 2, 1) - s.joints_view).max() < 1e-5


def test_splits_are_deterministic_disjoint_and_independent_of_train_size(splits):
    again = posebench.load_split("test", TINY)
    assert np.array_equal(again.pose_aa, splits["test"].pose_aa) and again.captions == splits["test"].captions
    rebuilt = posebench.load_split("test", dataclasses.replace(TINY, n_train=20))  # other key, built anew
    assert np.array_equal(rebuilt.pose_aa, splits["test"].pose_aa)
    assert np.array_equal(rebuilt.images, splits["test"].images)
    keys = {s: {p.round(5).tobytes() for p in splits[s].pose_aa} for s in posebench.SPLITS}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["val"]) and not (keys["val"] & keys["test"])


def test_images_show_a_centred_person_with_left_and_right_colours(splits):
    imgs = splits["test"].images.astype(np.int32)
    assert imgs.shape == (40, 32, 32, 3)
    bg = np.round(np.array(render.BACKGROUND) * 255).astype(np.int32)
    fg = (np.abs(imgs - bg).sum(-1) > 10)
    assert (fg.mean((1, 2)) > 0.05).all()
    blue = (imgs[..., 2] > imgs[..., 0] + 40) & fg
    orange = (imgs[..., 0] > imgs[..., 2] + 40) & fg
    assert (blue.any((1, 2)) | orange.any((1, 2))).all() and (blue.any((1, 2)) & orange.any((1, 2))).mean() > 0.7
    ys, xs = np.nonzero(fg.any(0))
    assert ys.min() <= 4 and ys.max() >= 27 or xs.min() <= 4 and xs.max() >= 27  # the crop fills the frame


def test_cache_is_reused_and_a_broken_cache_is_rebuilt_saying_so(splits, tmp_path, capsys):
    root = posebench.bench_dir(TINY)
    mtime = os.path.getmtime(os.path.join(root, "meta.json"))
    posebench.load_split("val", TINY)
    assert os.path.getmtime(os.path.join(root, "meta.json")) == mtime  # not rebuilt
    cfg = dataclasses.replace(TINY, seed=7, n_train=8, n_val=4, n_test=4)
    broken = posebench.build(cfg)
    good = posebench.load_split("val", cfg)
    with open(os.path.join(broken, "val.npz"), "wb") as fh:
        fh.write(b"truncated")
    with pytest.raises(ValueError, match="delete that directory"):
        posebench.load_split("val", cfg, rebuild=False)
    again = posebench.load_split("val", cfg)
    out = capsys.readouterr().out
    assert f"posebench cache {broken} is unreadable" in out and "building it again" in out
    assert np.array_equal(again.pose_aa, good.pose_aa)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="n_test must be >= 1"):
        posebench.build(dataclasses.replace(TINY, n_test=0))
    with pytest.raises(FileNotFoundError, match="smpl_path"):
        posebench.build(dataclasses.replace(TINY, smpl_path="/nonexistent/SMPL_NEUTRAL.pkl"))
    with pytest.raises(ValueError, match="unknown split"):
        posebench.load_split("training", TINY)


def test_cli_builds_prints_statistics_and_writes_preview(tmp_path):
    out = tmp_path / "preview.png"
    r = subprocess.run([sys.executable, "posebench.py", "--n_train", "16", "--n_val", "8", "--n_test", "32",
                        "--image_size", "32", "--preview", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "build time" in r.stdout and "caption ambiguity" in r.stdout
    assert out.stat().st_size > 10_000
    r = subprocess.run([sys.executable, "posebench.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--n_train" in r.stdout and "--preview" in r.stdout

"""realdata's loaders on small fixtures written in each dataset's real schema (PoseScript +
AMASS, HMR2.0-style npz, BEDLAM-Script as PoseEmbroider writes it, LLaVA-Instruct-150k), their
errors, the mixture, and body.py's HMR2.0 evaluation joints (14 LSP joints via a regressor)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import body
import data
import realdata
import vocab

# ---- helpers ---------------------------------------------------------------------------------

# collate needs no vocabulary
TOK = vocab.build_tokenizer(["The SMPL pose of this person is <POSE>.", "USER: ASSISTANT:"])


def rot(axis: str, a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def aa(R: np.ndarray) -> np.ndarray:
    return body.matrix_to_axis_angle(torch.as_tensor(R[None], dtype=torch.float64)).numpy()[0]


def mat(v) -> np.ndarray:
    return body.axis_angle_to_matrix(torch.as_tensor(np.asarray(v, dtype=np.float64)[None])).numpy()[0]


def posescript_reference(R: np.ndarray) -> np.ndarray:
    """naver/posescript's normalisation, as its text2pose/utils.py writes it: Euler angles
    tx = atan2(R21, R22), ty = atan2(-R20, sqrt(R21^2 + R22^2)), R' = Rz(0) Ry(ty) Rx(tx)."""
    tx = np.arctan2(R[2, 1], R[2, 2])
    ty = np.arctan2(-R[2, 0], np.hypot(R[2, 1], R[2, 2]))
    return rot("y", ty) @ rot("x", tx)


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def coord_image(W=200, H=160):
    """R = x, G = y, B = 77: every pixel tells where it came from."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.arange(W)[None, :]
    img[..., 1] = np.arange(H)[:, None]
    img[..., 2] = 77
    return img


# ---- PoseScript + AMASS ----------------------------------------------------------------------

Y_UP = rot("x", -np.pi / 2)  # AMASS's z-up world -> SMPL's y-up (posebench's)
ROOT_A = rot("z", 2.0) @ rot("y", 0.3) @ rot("x", 1.4)  # a root with yaw about AMASS's vertical z
ROOT_UP = rot("z", -0.7) @ rot("x", np.pi / 2)  # standing upright in AMASS's z-up world, turned


def write_amass(amass, seqs: dict) -> None:
    """AMASS sequences in the SMPL+H G npz layout: {relative path: poses (T, 156)} under `amass`."""
    for rel, poses in seqs.items():
        os.makedirs(amass / os.path.dirname(rel), exist_ok=True)
        np.savez(amass / rel, poses=poses, trans=np.zeros((len(poses), 3)), betas=np.zeros(16), gender="neutral",
                 mocap_framerate=120.0)


@pytest.fixture
def posescript(tmp_path):
    root, amass = tmp_path / "posescript_release", tmp_path / "AMASS" / "smplh"
    root.mkdir()
    rng = np.random.default_rng(0)
    seqs = {"CMU/01/01_01_poses.npz": rng.normal(0, 0.3, (5, 156)), "KIT/3/walk_poses.npz": rng.normal(0, 0.3, (3,
                                                                                                                156))}
    seqs["CMU/01/01_01_poses.npz"][2, :3] = aa(ROOT_A)
    seqs["KIT/3/walk_poses.npz"][0, :3] = aa(ROOT_UP)
    write_amass(amass, seqs)
    ids = {"0": ["AMASS", "CMU/01/01_01_poses.npz", 2], "1": ["AMASS", "KIT/3/walk_poses.npz", 0],
           "2": ["AMASS", "KIT/3/walk_poses.npz", 2], "3": ["AMASS", "CMU/01/01_01_poses.npz", 4]}
    (root / "ids_2_dataset_sequence_and_frame_index_100k.json").write_text(json.dumps(ids))
    (root / "train_ids_100k.json").write_text(json.dumps([0, 1, 3]))
    (root / "val_ids_100k.json").write_text(json.dumps([]))
    (root / "test_ids_100k.json").write_text(json.dumps([2]))
    (root / "posescript_human_6293.json").write_text(json.dumps({"1": "The person walks.", "2": "Arms up."}))
    (root / "posescript_auto_100k.json").write_text(json.dumps({"0": ["Left knee bent.", "Legs apart.", "Kneeling."],
                                                                "1": ["Right arm forward."], "2": ["Hands up."]}))
    return str(root), str(amass), seqs


def test_posescript_targets_captions_and_splits(posescript):
    root, amass, seqs = posescript
    ds = realdata.PoseScript(root, amass, "train", seed=1)
    assert len(ds) == 2 and ds.ids == [0, 1]  # pose 3 has no caption: left out, as PoseScript does
    assert ds.captions[1] == ["The person walks.", "Right arm forward."]  # human + automatic
    a = ds.pose_aa(0)
    src = seqs["CMU/01/01_01_poses.npz"][2]
    assert np.allclose(mat(a[0]), Y_UP @ posescript_reference(ROOT_A), atol=1e-6)  # the yaw about z is gone, y-up
    assert np.allclose(a[1:22], src[3:66].reshape(21, 3)) and np.allclose(a[22:], 0)  # body joints; hands identity
    s = ds[0]
    assert s.task == "text_to_pose" and s.text in ds.captions[0] and s.text in s.prompt and s.answer == data.POSE_ANSWER
    expected6d = data.pose_aa_to_6d(a[None])[0]
    assert np.allclose(s.pose6d, expected6d, atol=1e-6) and s.joints is None and s.image is None
    assert ds[0].prompt == s.prompt  # sample i depends on (seed, i) only
    h2 = realdata.PoseScript(root, amass, "test", captions=("human",))  # PoseScript-H2 test
    assert h2.ids == [2] and h2.captions == [["Arms up."]]
    # joints through a body model; the y-up frame makes an upright root the identity, as in posebench
    j = realdata.PoseScript(root, amass, "train", bodymodel=body.BodyModel()).sample(0).joints
    assert j.shape == (24, 3) and np.allclose(j[0], 0)
    assert np.allclose(ds.pose_aa(1)[0], 0, atol=1e-6)


def write_posescript(root, amass, poses_zup, captions):
    """A PoseScript release + AMASS in their layouts: pose i is frame i of one SMPL+H G sequence,
    train split, one automatic caption each. poses_zup: (N, 24, 3) axis-angle, AMASS's z-up world."""
    os.makedirs(root, exist_ok=True)
    os.makedirs(os.path.join(amass, "CMU", "01"), exist_ok=True)
    smplh = np.zeros((len(poses_zup), 156))
    smplh[:, :66] = np.asarray(poses_zup)[:, :22].reshape(-1, 66)
    np.savez(os.path.join(amass, "CMU", "01", "01_01_poses.npz"), poses=smplh, trans=np.zeros((len(smplh), 3)),
             betas=np.zeros(16), gender="neutral", mocap_framerate=120.0)
    n = len(poses_zup)
    files = {"ids_2_dataset_sequence_and_frame_index_100k.json": {str(i): ["AMASS", "CMU/01/01_01_poses.npz", i]
                                                                  for i in range(n)},
             "train_ids_100k.json": list(range(n)), "val_ids_100k.json": [], "test_ids_100k.json": [],
             "posescript_human_6293.json": {}, "posescript_auto_100k.json": {str(i): [c] for i,
                                                                             c in enumerate(captions)}}
    for name, obj in files.items():
        with open(os.path.join(root, name), "w") as fh:
            json.dump(obj, fh)


def test_amass_and_posebench_frames_give_the_same_joints_and_embedding(tmp_path):
    """One pose written in posebench's frame and in AMASS's (z-up, turned about the vertical) loads to
    the same pose, joints and retriever embeddings."""
    import posebench
    import retrieval

    _, _, pb = posebench.sample_poses(40, np.random.default_rng(3))
    pb[:, 22:] = 0  # SMPL+H has no SMPL hand joints: PoseScript's loader sets them to identity
    pb[:, 0] = [[-1.45, 0, 0], [0.6, 0, 0], [0, 0, 0]] * 13 + [[0.2, 0, 0]]  # pitched roots (bent, lying), no roll
    zup = pb.copy()
    yaw = np.random.default_rng(4).uniform(-np.pi, np.pi, len(pb))
    zup[:, 0] = [aa(rot("z", t) @ Y_UP.T @ mat(r)) for t, r in zip(yaw, pb[:, 0])]  # posebench -> AMASS, turned
    root, amass = str(tmp_path / "ps"), str(tmp_path / "amass")
    write_posescript(root, amass, zup, [f"pose {i}" for i in range(len(pb))])
    bm = body.BodyModel()
    ds = realdata.PoseScript(root, amass, "train", captions=("auto",), bodymodel=bm)
    loaded = [ds.sample(i) for i in range(len(ds))]
    with torch.no_grad():
        j = bm(torch.as_tensor(pb[:, 0], dtype=torch.float32), torch.as_tensor(pb[:, 1:], dtype=torch.float32)).joints
    want_joints = (j - j[:, :1]).numpy()
    got_joints = np.stack([s.joints for s in loaded])
    assert np.abs(got_joints - want_joints).max() < 1e-5
    got6d, want6d = np.stack([s.pose6d for s in loaded]), data.pose_aa_to_6d(pb)
    assert np.abs(got6d - want6d).max() < 1e-5
    torch.manual_seed(0)
    for kind in retrieval.POSE_FEATURES:
        r = retrieval.TextPoseRetriever(retrieval.RetrieverConfig(pose_features=kind, embed_dim=8,
                                                                  hidden_dim=16)).eval()
        with torch.no_grad():
            assert torch.allclose(r.embed_pose(torch.as_tensor(got6d)), r.embed_pose(torch.as_tensor(want6d)),
                                  atol=1e-5)
    # any root: the turn about AMASS's vertical is gone, and the root is PoseScript's rule in y-up
    rng = np.random.default_rng(5)
    R0 = mat(rng.normal(0, 0.8, 3))
    turned = [aa(rot("z", t) @ R0) for t in (0.0, 1.0, -2.5)]
    out = realdata.text_pose_frame(np.stack(turned))
    assert np.abs(out - out[:1]).max() < 1e-6 and np.allclose(mat(out[0]), Y_UP @ posescript_reference(R0), atol=1e-6)


def test_posescript_errors_name_dataset_file_record(posescript, tmp_path):
    root, amass, _ = posescript
    with pytest.raises(FileNotFoundError, match="PoseScript: release directory .*posescript_release_v2.zip"):
        realdata.PoseScript(str(tmp_path / "nowhere"), amass)
    with pytest.raises(FileNotFoundError, match="PoseScript: AMASS directory .*amass.is.tue.mpg.de"):
        realdata.PoseScript(root, str(tmp_path / "no_amass"))
    ids_file = os.path.join(root, "ids_2_dataset_sequence_and_frame_index_100k.json")
    ids = json.load(open(ids_file))
    json.dump({**ids, "1": ["BABEL", "x.npz", 0]}, open(ids_file, "w"))
    with pytest.raises(realdata.DataFormatError, match=r"ids_2_.*record '1'.*dataset 'BABEL' unknown"):
        realdata.PoseScript(root, amass)
    json.dump({k: v for k, v in ids.items() if k != "1"}, open(ids_file, "w"))
    with pytest.raises(realdata.DataFormatError, match="record '1'.*missing"):
        realdata.PoseScript(root, amass)
    json.dump({**ids, "1": ["AMASS", "KIT/3/walk_poses.npz"]}, open(ids_file, "w"))
    with pytest.raises(realdata.DataFormatError, match=r"record '1'.*expected \[\"AMASS\""):
        realdata.PoseScript(root, amass)
    json.dump({**ids, "1": ["AMASS", "KIT/3/walk_poses.npz", 7]}, open(ids_file, "w"))
    with pytest.raises(realdata.DataFormatError, match="walk_poses.npz, record 1: frame 7 out of range for 3 frames"):
        realdata.PoseScript(root, amass).pose_aa(1)
    json.dump({**ids, "1": ["AMASS", "KIT/3/gone_poses.npz", 0]}, open(ids_file, "w"))
    with pytest.raises(FileNotFoundError, match="AMASS sequence of pose 1 .*gone_poses.npz"):
        realdata.PoseScript(root, amass).pose_aa(1)
    json.dump(ids, open(ids_file, "w"))
    np.savez(os.path.join(amass, "KIT/3/walk_poses.npz"), poses=np.zeros((3, 165)))  # SMPL-X, not SMPL+H
    with pytest.raises(realdata.DataFormatError,
                       match=r"walk_poses.npz: 'poses' has shape \(3, 165\); expected \(T, 156\)"):
        realdata.PoseScript(root, amass).pose_aa(1)
    (tmp_path / "posescript_release" / "posescript_auto_100k.json").write_text('{"0": 5}')
    with pytest.raises(realdata.DataFormatError, match="posescript_auto_100k.json, record '0'"):
        realdata.PoseScript(root, amass)
    (tmp_path / "posescript_release" / "posescript_auto_100k.json").write_text('{"0": ["a"')
    with pytest.raises(realdata.DataFormatError, match="not valid JSON"):
        realdata.PoseScript(root, amass)


# ---- HMR2.0-style image npz -------------------------------------------------------------------


def test_crop_person_is_hmr2s_window():
    img = coord_image()
    # a tall 60 x 120 box expands to 90 x 120 (3 : 4); the square crop has side 120
    out = realdata.crop_person(img, (100, 90), (60, 120), 120)
    assert out.shape == (120, 120, 3)
    assert (out[:, :, 0] == np.arange(40, 160)[None, :]).all() and (out[:, :, 1] == np.arange(30, 150)[:, None]).all()
    # a wide box: 120 x 30 -> 120 x 160, side 160; outside the image is black
    out = realdata.crop_person(img, (20, 20), (120, 30), 160)
    assert (out[0, :, 2] == 0).all() and (out[100, 100] == [100 - 60, 100 - 60, 77]).all()
    assert realdata.expand_to_aspect(np.array([[60, 120], [120, 30]])).tolist() == [[90, 120], [120, 160]]


@pytest.fixture
def hmr2(tmp_path):
    imgs = tmp_path / "3DPW"
    save_png(imgs / "imageFiles/downtown/image_00000.jpg.png", coord_image())
    save_png(imgs / "imageFiles/downtown/image_00001.jpg.png", 255 - coord_image())
    rng = np.random.default_rng(0)
    body_pose = rng.normal(0, 0.2, (3, 72))
    extra3d = np.concatenate([rng.normal(0, 0.3, (3, 19, 3)), np.ones((3, 19, 1))], -1)
    arrays = dict(imgname=np.array(["imageFiles/downtown/image_00000.jpg.png", "imageFiles/downtown/none.png",
                                    "imageFiles/downtown/image_00001.jpg.png"]),
                  center=np.array([[100.0, 80.0], [10.0, 10.0], [90.0, 70.0]]), scale=np.array([120.0, 50.0, 100.0]),
                  body_pose=body_pose, has_body_pose=np.array([1.0, 0.0, 1.0]), betas=rng.normal(0, 0.5, (3, 10)),
                  has_betas=np.ones(3), extra_keypoints_3d=extra3d, body_keypoints_2d=np.zeros((3, 25, 3)),
                  extra_info=np.zeros(3))
    np.savez(tmp_path / "3dpw_test.npz", **arrays)
    return str(tmp_path / "3dpw_test.npz"), str(imgs), arrays


def test_hmr2_npz_samples_and_gt_joints(hmr2):
    npz, imgs, arrays = hmr2
    ds = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=64, bodymodel=body.BodyModel())
    assert len(ds) == 2  # record 1 has no pose (has_body_pose 0)
    s = ds[1]
    assert s.task == "image_to_pose" and s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.prompt in data.PROMPTS["image_to_pose"] and s.answer == data.POSE_ANSWER
    assert np.allclose(s.pose6d, data.pose_aa_to_6d(arrays["body_pose"][2].reshape(1, 24, 3))[0], atol=1e-6)
    bm = body.BodyModel()
    aa_ = torch.as_tensor(arrays["body_pose"][2].reshape(1, 24, 3), dtype=torch.float32)
    j = bm(aa_[:, 0], aa_[:, 1:], torch.as_tensor(arrays["betas"][2:3], dtype=torch.float32)).joints[0].numpy()
    assert np.allclose(s.joints, j - j[:1], atol=1e-5)
    gt = ds.gt_lsp14()
    kp = arrays["extra_keypoints_3d"][[0, 2], :, :3]
    assert gt.shape == (2, 14, 3) and np.allclose(gt[1, 13], kp[1, 18] - kp[1, 14])
    # the crop: centre (100, 80), a 120-px box -> square 160 (the box expanded to 120 x 160)
    big = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=160).sample(0)
    assert big.image[80, 80, 0] == 100 and big.image[80, 80, 1] == 80
    # SPIN-style scale (box / 200) gives the same crop
    np.savez(npz, **{**arrays, "scale": arrays["scale"] / 200})
    spin = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=160, scale_in_200px=True).sample(0)
    assert np.array_equal(spin.image, big.image)
    # SPIN's own field names (pose, shape, has_smpl; scale / 200) read as the same sample
    np.savez(npz, imgname=arrays["imgname"], center=arrays["center"], scale=arrays["scale"] / 200,
             pose=arrays["body_pose"], shape=arrays["betas"], has_smpl=arrays["has_body_pose"], part=np.zeros((3, 24,
                                                                                                               3)))
    spin = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=160).sample(0)
    assert np.array_equal(spin.image, big.image) and np.allclose(spin.pose6d, big.pose6d)
    # without has_smpl every record has its pose (SPIN's base_dataset); without pose, SPIN's COCO/MPII/H36M
    np.savez(npz, imgname=arrays["imgname"], center=arrays["center"], scale=arrays["scale"] / 200,
             pose=arrays["body_pose"], shape=arrays["betas"], part=np.zeros((3, 24, 3)))
    assert len(realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=160)) == 3
    np.savez(npz, imgname=arrays["imgname"], center=arrays["center"], scale=arrays["scale"] / 200,
             part=np.zeros((3, 24, 3)))
    with pytest.raises(realdata.DataFormatError, match="SPIN's COCO, MPII and Human3.6M npz carry no SMPL pose"):
        realdata.HMR2ImageDataset("COCO", npz, imgs)
    b = data.collate([s, ds[0]], TOK, 4)  # real samples collate like posebench ones
    assert b.pixel_values.shape == (2, 3, 64, 64) and b.pose_valid.all()


def test_hmr2_npz_errors(hmr2, tmp_path):
    npz, imgs, arrays = hmr2
    with pytest.raises(FileNotFoundError, match="H36M: annotation file .*h36m.npz not found"):
        realdata.HMR2ImageDataset("H36M", str(tmp_path / "h36m.npz"), imgs)
    with pytest.raises(FileNotFoundError, match="3DPW: image directory"):
        realdata.HMR2ImageDataset("3DPW", npz, str(tmp_path / "no_images"))
    np.savez(npz, **{k: v for k, v in arrays.items() if k != "center"})
    with pytest.raises(realdata.DataFormatError,
                       match=r"3DPW: .*3dpw_test.npz: missing \['center'\].*expected imgname"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)
    np.savez(npz, **{**arrays, "body_pose": arrays["body_pose"][:, :69]})
    with pytest.raises(realdata.DataFormatError, match=r"body_pose has shape \(3, 69\); expected \(3, 72\)"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)
    np.savez(npz, **{**arrays, "extra_keypoints_3d": arrays["extra_keypoints_3d"][..., :3]})
    with pytest.raises(realdata.DataFormatError,
                       match=r"extra_keypoints_3d has shape \(3, 19, 3\); expected \(3, 19, 4\)"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)
    np.savez(npz, **{**arrays, "has_body_pose": np.ones(3)})
    with pytest.raises(FileNotFoundError, match="3DPW: image .*none.png of record 1 of .*3dpw_test.npz not found"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)[1]
    bad = arrays["body_pose"].copy()
    bad[0, 5] = np.nan
    np.savez(npz, **{**arrays, "body_pose": bad})
    with pytest.raises(realdata.DataFormatError, match="3dpw_test.npz, record 0 .*non-finite"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)[0]
    np.savez(npz, **{**arrays, "has_body_pose": np.zeros(3)})
    with pytest.raises(realdata.DataFormatError, match="no record has has_body_pose"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)
    np.savez(npz, **{k: v for k, v in arrays.items() if k not in ("body_pose", "has_body_pose")})
    with pytest.raises(realdata.DataFormatError, match=r"missing \['body_pose', 'has_body_pose'\].*training needs"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)


def test_damaged_npz_and_nan_ground_truth_are_named(hmr2, tmp_path):
    npz, imgs, arrays = hmr2
    with open(npz, "r+b") as fh:  # truncated
        fh.truncate(200)
    with pytest.raises(realdata.DataFormatError, match=r"3DPW: .*3dpw_test.npz: not a readable npz \(not a zip "
                                                       r"archive\); the file is truncated, corrupt or of another "
                                                       r"format: download it again"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs)
    open(npz, "w").write("not a zip")
    with pytest.raises(realdata.DataFormatError, match=r"3dpw_test.npz: not a readable npz"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs, require_pose=False)
    np.savez(npz, **{k: v[:0] for k, v in arrays.items()})
    with pytest.raises(realdata.DataFormatError, match=r"3dpw_test.npz: no records \(imgname is empty\)"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs, require_pose=False)
    kp = arrays["extra_keypoints_3d"].copy()
    kp[2, 4, 1] = np.nan
    np.savez(npz, **{**arrays, "extra_keypoints_3d": kp})
    with pytest.raises(realdata.DataFormatError, match=r"3dpw_test.npz, record 2: NaN/inf ground-truth keypoints "
                                                       r"\(extra_keypoints_3d\) in 1 record\(s\), first \[2\]"):
        realdata.HMR2ImageDataset("3DPW", npz, imgs, require_pose=False).gt_lsp14()


def test_posescript_captions_that_are_a_list_empty_or_far_too_long(posescript, capsys):
    root, amass, _ = posescript
    human = os.path.join(root, "posescript_human_6293.json")
    json.dump(["The person walks.", "Arms up."], open(human, "w"))
    with pytest.raises(realdata.DataFormatError, match=r"posescript_human_6293.json: holds a list; expected "
                                                       r'\{"<pose id>": caption or \[captions\]\}'):
        realdata.PoseScript(root, amass)
    json.dump({"1": "The person walks.", "2": "  "}, open(human, "w"))
    with pytest.raises(realdata.DataFormatError, match=r"posescript_human_6293.json, record '2': an empty caption"):
        realdata.PoseScript(root, amass, "test", captions=("human",))
    long = "The left knee is bent. " * 5000  # 115,000 characters: far past any model's positions
    json.dump({"1": long, "2": long}, open(human, "w"))
    ds = realdata.PoseScript(root, amass, "test", captions=("human",))
    assert ds.captions == [[long[:realdata.MAX_CAPTION_CHARS]]]
    out = capsys.readouterr().out
    assert (f"warning: PoseScript: {human}: 2 caption(s) longer than {realdata.MAX_CAPTION_CHARS} characters cut to "
            f"{realdata.MAX_CAPTION_CHARS} (the longest had {len(long)}") in out
    realdata.fit_captions(ds, TOK, 50)  # to the positions of a model (evaluate.py), by its tokenizer
    assert len(TOK(ds.captions[0][0], add_special_tokens=False)["input_ids"]) == 50
    assert long.startswith(ds.captions[0][0]) and "caption(s) longer than 50 tokens" in capsys.readouterr().out


def test_hmr2_npz_for_evaluation_serves_every_record(hmr2):
    """HMR2.0's protocol (evaluate.py): every record, with or without an SMPL pose, and no body_pose needed."""
    npz, imgs, arrays = hmr2
    train = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=64)
    ev = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=64, require_pose=False)
    assert len(train) == 2 and len(ev) == 3  # record 1 (has_body_pose 0) is evaluated too
    assert np.allclose(ev.gt_lsp14()[[0, 2]], train.gt_lsp14()) and ev.gt_lsp14().shape == (3, 14, 3)
    assert np.array_equal(ev.sample(2).image, train.sample(1).image) and np.allclose(ev.sample(2).pose6d,
                                                                                       train.sample(1).pose6d)
    np.savez(npz, **{k: v for k, v in arrays.items() if k not in ("body_pose", "has_body_pose")})
    ev = realdata.HMR2ImageDataset("3DPW", npz, imgs, image_size=64, require_pose=False)
    s = ev.sample(2)
    assert len(ev) == 3 and s.pose6d is None and s.joints is None and np.array_equal(s.image, train.sample(1).image)
    b = data.collate([s], TOK, 4)
    assert not b.pose_valid.any() and b.pose_token_pos.item() >= 0  # the <POSE> state is still read


# ---- BEDLAM-Script ------------------------------------------------------------------------------


@pytest.fixture
def bedlam(tmp_path):
    proc, imgs = tmp_path / "processed", tmp_path / "bedlam_images"
    proc.mkdir()
    wide = coord_image(W=200, H=120)
    save_png(imgs / "training/seq_000001/png/seq_000001_0000.png", wide)
    closeup = np.zeros((200, 120, 3), np.uint8)
    closeup[:, :30] = 255  # the stored image's left band becomes the top band once turned back
    save_png(imgs / "training/seq_000002_closeup/png/seq_000002_0000.png", closeup)
    rng = np.random.default_rng(0)

    def human(x1, y1, x2, y2):  # the shapes of PoseEmbroider's process_bedlam_step2.py (pose_to_dict)
        return {"smplx_root_cam": rng.normal(0, 0.3, 3).astype(np.float32),
                "smplx_global_orient": rng.normal(0, 0.3, (1, 3)).astype(np.float32),
                "smplx_body_pose": rng.normal(0, 0.2, (21, 3)).astype(np.float32),
                "smplx_left_hand_pose": np.zeros((15, 3), np.float32), "smplx_right_hand_pose": np.zeros((15, 3),
                                                                                                         np.float32),
                "smplx_shape": np.zeros(11, np.float32), "smplx_transl": np.zeros(3, np.float32),
                "smplx_tight_bbox": np.array([x1, y1, x2, y2], dtype=np.float32)}

    a = "seq_000001/png/seq_000001_0000.png"
    c = "seq_000002_closeup/png/seq_000002_0000.png"
    ann = {c: [human(10, 10, 60, 100)], a: [human(80, 20, 120, 100), human(0, 0, 30, 30)]}
    # data ids: a 0 -> 0, a 1 -> 1, c 0 -> 2
    sel = {"criteria": {"scale_factor": 1.1, "overlap": 30}, a: [0, 1], c: [0]}
    # do.sh: farther sampling orders the ids (step 4); step 5 captions the first N = 2 of them, {0, 2},
    # caption i for the i-th of them in data id order
    references = {0: [a, np.int64(0)], 1: [a, np.int64(1)], 2: [c, np.int64(0)]}
    torch.save([references, [2, 0, 1], torch.zeros(3)], proc / "farther_sample_training_3_try.pt")
    caps = {0: ["A0", "A0b", "A0c"], 1: ["C0", "C0b", "C0c"]}
    for name, obj in (("bedlam_training_try.pkl", ann), ("imgpaths_bedlam_to_selected_human_index_training_try.pkl",
                                                         sel),
                      ("bedlam_training_3caps_fs2_try.pkl", caps)):
        with open(proc / name, "wb") as fh:
            pickle.dump(obj, fh)
    return str(proc), str(imgs), ann, a, c


def test_bedlam_script_text_poses_in_the_text_to_pose_frame(bedlam):
    """BEDLAM's y-up world orientation reaches the text-to-pose frame: an upright body turned about BEDLAM's
    vertical gets the identity root; without images, poses and captions are still read (retrieval.py)."""
    proc, imgs, ann, a, c = bedlam
    ann[a][0]["smplx_global_orient"] = aa(rot("y", 0.7))[None].astype(np.float32)  # upright, turned
    ann[c][0]["smplx_global_orient"] = aa(rot("y", -2.0) @ rot("x", 0.5))[None].astype(np.float32)  # bent forward
    with open(os.path.join(proc, "bedlam_training_try.pkl"), "wb") as fh:
        pickle.dump(ann, fh)
    ds = realdata.BEDLAMScript(proc, "", "training")
    poses = ds.text_pose_aa()
    assert np.allclose(poses[0, 0], 0, atol=1e-6) and np.allclose(mat(poses[1, 0]), rot("x", 0.5), atol=1e-6)
    assert np.allclose(poses[0, 1:22], ann[a][0]["smplx_body_pose"]) and np.allclose(poses[:, 22:], 0)
    assert ds.preflight() == []
    with pytest.raises(ValueError, match="no image directory was given"):
        ds.sample(0)
    del ann[a][0]["smplx_global_orient"]
    with open(os.path.join(proc, "bedlam_training_try.pkl"), "wb") as fh:
        pickle.dump(ann, fh)
    with pytest.raises(realdata.DataFormatError,
                       match="bedlam_training_try.pkl, record .*seq_000001.*no smplx_global_orient"):
        realdata.BEDLAMScript(proc, "", "training").text_pose_aa()


def test_bedlam_script_describe_and_pose(bedlam):
    proc, imgs, ann, a, c = bedlam
    ds = realdata.BEDLAMScript(proc, imgs, "train", image_size=64)
    assert [it[0] for it in ds.items] == [a, c]  # sorted image paths, selected humans only
    s = ds.sample(0, caption=1)
    assert s.task == "vqa" and s.answer == "A0b" and s.prompt == realdata.DESCRIBE_PROMPT and s.pose6d is None
    assert s.image.shape == (64, 64, 3)
    top = ds.sample(1).image  # the closeup, turned back: its white band is now at the top
    assert top[:8].mean() > top[-8:].mean() + 50
    p = realdata.BEDLAMScript(proc, imgs, "training", task="image_to_pose", image_size=64).sample(0)
    h = ann[a][0]
    want = np.zeros((1, 24, 3))
    want[0, 0], want[0, 1:22] = h["smplx_root_cam"], h["smplx_body_pose"].reshape(21, 3)
    assert p.task == "image_to_pose" and np.allclose(p.pose6d, data.pose_aa_to_6d(want)[0], atol=1e-6)
    # the crop centre is the tight box's centre: (100, 60) in R = x, G = y
    big = realdata.BEDLAMScript(proc, imgs, "training", image_size=176).sample(0).image
    assert abs(int(big[88, 88, 0]) - 100) <= 1 and abs(int(big[88, 88, 1]) - 60) <= 1
    # step 5 run on the whole selection (no --farther_sample): every selected human, caption i for data id i
    os.remove(os.path.join(proc, "bedlam_training_3caps_fs2_try.pkl"))
    with open(os.path.join(proc, "bedlam_training_3caps_try.pkl"), "wb") as fh:
        pickle.dump({0: ["A0"], 1: ["A1"], 2: ["C0"]}, fh)
    ds = realdata.BEDLAMScript(proc, imgs, "training", image_size=64)
    assert [(it[0], it[2][0]) for it in ds.items] == [(a, "A0"), (a, "A1"), (c, "C0")]


def test_bedlam_script_errors(bedlam, tmp_path):
    proc, imgs, ann, a, c = bedlam
    sel_path = os.path.join(proc, "imgpaths_bedlam_to_selected_human_index_training_try.pkl")
    sel = pickle.load(open(sel_path, "rb"))
    pickle.dump({**sel, a: [5]}, open(sel_path, "wb"))
    with pytest.raises(realdata.DataFormatError,
                       match="BEDLAM-Script: .*selected_human_index.*human index 5 out of range"):
        realdata.BEDLAMScript(proc, imgs)
    pickle.dump({k: v for k, v in sel.items() if k != "criteria"}, open(sel_path, "wb"))
    with pytest.raises(realdata.DataFormatError, match="record 'criteria'.*scale_factor"):
        realdata.BEDLAMScript(proc, imgs)
    open(sel_path, "wb").write(pickle.dumps(sel)[:40])  # truncated
    with pytest.raises(realdata.DataFormatError, match=r"selected_human_index_training_try.pkl: not a readable pickle "
                                                       r"\(.*\); the file is truncated or corrupt"):
        realdata.BEDLAMScript(proc, imgs)
    pickle.dump(sel, open(sel_path, "wb"))
    ann_path = os.path.join(proc, "bedlam_training_try.pkl")
    broken = {**ann, a: [{k: v for k, v in ann[a][0].items() if k != "smplx_tight_bbox"}]}
    pickle.dump(broken, open(ann_path, "wb"))
    with pytest.raises(realdata.DataFormatError,
                       match=r"bedlam_training_try.pkl, record '.*human 0'.*missing \['smplx_tight_bbox'\]"):
        realdata.BEDLAMScript(proc, imgs)
    import datetime
    pickle.dump({a: [ann[a][0]], "when": datetime.date(2024, 1, 1)}, open(ann_path, "wb"))
    with pytest.raises(realdata.DataFormatError, match="holds a datetime.date object"):
        realdata.BEDLAMScript(proc, imgs)
    pickle.dump(ann, open(ann_path, "wb"))
    caps_path = os.path.join(proc, "bedlam_training_3caps_fs2_try.pkl")
    pickle.dump({0: ["A0"]}, open(caps_path, "wb"))
    with pytest.raises(realdata.DataFormatError, match=r"3caps_fs2_try.pkl, record 1: expected a list of captions for "
                                                       r"data id 2"):
        realdata.BEDLAMScript(proc, imgs)
    pickle.dump({0: ["A0"], 1: ["C0"], 2: ["X"]}, open(caps_path, "wb"))
    with pytest.raises(realdata.DataFormatError,
                       match="3 captioned humans, but the selection and farther sampling give 2"):
        realdata.BEDLAMScript(proc, imgs)
    pickle.dump({0: ["A0"]}, open(os.path.join(proc, "bedlam_training_3caps_fs5_try.pkl"), "wb"))
    with pytest.raises(realdata.DataFormatError, match="holds 2 caption files for training"):
        realdata.BEDLAMScript(proc, imgs)
    os.remove(caps_path)
    with pytest.raises(realdata.DataFormatError,
                       match="selects 3 humans, fewer than the 5 that bedlam_training_3caps_fs5"):
        realdata.BEDLAMScript(proc, imgs)
    os.remove(os.path.join(proc, "farther_sample_training_3_try.pt"))
    with pytest.raises(FileNotFoundError, match="no farther_sample_training_<M>_try.pt"):
        realdata.BEDLAMScript(proc, imgs)
    with pytest.raises(FileNotFoundError,
                       match="BEDLAM-Script: file .*bedlam_validation_try.pkl not found.*poseembroider"):
        realdata.BEDLAMScript(proc, imgs, "val")


# ---- LLaVA-Instruct-150k -----------------------------------------------------------------------


@pytest.fixture
def llava_instruct(tmp_path):
    coco = tmp_path / "coco" / "train2017"
    save_png(coco / "000000033471.jpg", coord_image(W=100, H=50))
    recs = [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
                {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "An advertisement."}]},
            {"id": "text-1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(recs))
    return str(tmp_path / "llava_instruct_150k.json"), str(coco), recs


def test_llava_instruct_turns(llava_instruct):
    path, coco, _ = llava_instruct
    ds = realdata.LLaVAInstruct(path, coco, image_size=32)
    assert len(ds) == 3
    s = ds[0]
    assert s.task == "vqa" and s.prompt == "<image>\nWhat are the colors of the bus in the image?"
    assert s.answer == "The bus in the image is white and red." and s.image.shape == (32, 32, 3)
    assert ds[1].prompt.startswith("<image>\nWhat feature") and ds[2].image is None and ds[2].prompt == "Say hi."
    assert tuple(s.image[1, 16]) == (122, 116, 104)  # padded to a square with CLIP's mean colour, as LLaVA-1.5
    data.collate([ds[0], ds[1]], TOK, 2)


def test_llava_instruct_errors(llava_instruct, tmp_path):
    path, coco, recs = llava_instruct
    bad = [dict(recs[0], conversations=recs[0]["conversations"][:3])]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(realdata.DataFormatError, match="bad.json, record '000000033471': expected"):
        realdata.LLaVAInstruct(str(tmp_path / "bad.json"), coco)
    bad = [dict(recs[1], conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}])]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(realdata.DataFormatError, match="record 'text-1': turn 0 is not a human/gpt pair"):
        realdata.LLaVAInstruct(str(tmp_path / "bad.json"), coco)
    (tmp_path / "bad.json").write_text(json.dumps([dict(recs[0], image="gone.jpg")]))
    with pytest.raises(FileNotFoundError, match="LLaVA-Instruct-150k: image .*gone.jpg of record 0 .*train2017"):
        realdata.LLaVAInstruct(str(tmp_path / "bad.json"), coco)[0]
    with pytest.raises(FileNotFoundError, match="LLaVA-Instruct-150k: file .*absent.json not found"):
        realdata.LLaVAInstruct(str(tmp_path / "absent.json"), coco)


def test_mixture_is_deterministic_and_weighted(llava_instruct, posescript):
    path, coco, _ = llava_instruct
    root, amass, _ = posescript
    parts = [(realdata.LLaVAInstruct(path, coco, image_size=32), 1.0), (realdata.PoseScript(root, amass), 3.0)]
    mix = realdata.Mixture(parts, length=200, seed=3)
    tasks = [mix[i].task for i in range(200)]
    assert 120 < tasks.count("text_to_pose") < 180 and tasks.count("vqa") > 20
    assert mix[7].prompt == realdata.Mixture(parts, length=5, seed=3)[7].prompt
    # independent draws: over many indices every pose comes with several of its captions and paraphrases
    # (one draw per item, as a pool the size of the data gives, would fix one caption per pose)
    fresh = realdata.Mixture([(parts[1][0], 1.0)], length=data.FRESH_DRAWS, seed=3)
    seen = {}
    for i in range(40 * len(parts[1][0])):
        smp = fresh[i]
        seen.setdefault(smp.index, set()).add(smp.prompt)
    assert len(seen) == len(parts[1][0]) and min(len(v) for v in seen.values()) > 1
    with pytest.raises(ValueError, match="weights"):
        realdata.Mixture([(parts[0][0], 0.0)], length=3)


# ---- evaluation joints (body.py) ---------------------------------------------------------------


def test_lsp14_protocol_matches_hmr2_keypoints(tmp_path):
    """The 14 joints from vertices through a J19 regressor equal HMR2.0's ground truth read from the
    npz keypoints made by the same regressor; H36M's regressor maps its own way; mm errors."""
    bm = body.BodyModel()
    pose = torch.randn(2, 24, 3) * 0.2
    verts = bm(pose[:, 0], pose[:, 1:]).vertices.double()  # (2, V, 3)
    V = verts.shape[1]
    rng = np.random.default_rng(0)
    j19 = rng.random((19, V))
    j19 /= j19.sum(1, keepdims=True)
    np.save(tmp_path / "j19.npy", j19)
    with open(tmp_path / "j19.pkl", "wb") as fh:
        pickle.dump(j19, fh)
    assert np.array_equal(realdata.load_joint_regressor(str(tmp_path / "j19.pkl")), j19)
    reg = realdata.load_joint_regressor(str(tmp_path / "j19.npy"))
    ours = realdata.lsp14_from_vertices(verts, reg)
    kp = torch.einsum("kv,bvc->bkc", torch.as_tensor(j19), verts).numpy()
    extra = np.concatenate([kp, np.ones((2, 19, 1))], -1)
    ds = realdata.HMR2ImageDataset.__new__(realdata.HMR2ImageDataset)  # only the keypoints are needed
    ds.name, ds.npz_path, ds.rows, ds.arr = "3DPW", "x.npz", np.arange(2), {"extra_keypoints_3d": extra}
    assert np.allclose(ours.numpy(), ds.gt_lsp14(), atol=1e-9)
    h36m = rng.random((17, V))
    j = torch.einsum("kv,bvc->bkc", torch.as_tensor(h36m), verts)
    out = realdata.lsp14_from_vertices(verts, h36m)
    assert torch.allclose(out[:, 0], j[:, 6] - j[:, 0]) and torch.allclose(out[:, 13], j[:, 10] - j[:, 0])
    err = realdata.lsp14_mpjpe_mm(out, out + torch.tensor([0.003, 0.004, 0.0], dtype=torch.float64))
    assert torch.allclose(err, torch.full((2,), 5.0, dtype=torch.float64))
    np.save(tmp_path / "bad.npy", np.zeros((24, V)))
    with pytest.raises(ValueError, match=r"shape \(24, .*expected \(17, V\)"):
        realdata.load_joint_regressor(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="the same V"):
        realdata.lsp14_from_vertices(verts, np.zeros((17, 6890)))
    with pytest.raises(FileNotFoundError, match="J_regressor_h36m.npy comes from SPIN"):
        realdata.load_joint_regressor(str(tmp_path / "absent.npy"))

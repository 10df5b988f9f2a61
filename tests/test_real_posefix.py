"""The pose-input tasks on real data: PoseFix's triplets (realdata.PoseFix) and PoseScript's captions as
pose-to-text (realdata.PoseScript(task="pose_to_text")), on fixtures written in the public releases' schema
(naver/posescript: text2pose/config.py, data.py's load_posefix and PoseFix.get_poses_AB)."""
import json
import os

import numpy as np
import pytest
import torch

import body
import data
import realdata
import vocab
from realdata.posefix import PoseFix
from test_real_data import aa, mat, posescript_reference, rot, write_amass, Y_UP

ROOT_A = rot("z", 2.0) @ rot("y", 0.3) @ rot("x", 1.4)  # yaw 2.0 about AMASS's vertical z
ROOT_B = rot("z", 2.6) @ rot("x", 1.2)  # the same sequence, turned a further 0.6 about the vertical
ROOT_C = rot("z", -1.1) @ rot("y", -0.2) @ rot("x", 1.5)  # another sequence


def posefix_normalizer(R_a: np.ndarray) -> np.ndarray:
    """PoseFix's rotation for an in-sequence pair (its utils.get_pose_data_from_file with output_rotation): the
    rotation that took A to its normalised root, R = A' A^-1, PoseScript's A' = Ry(ty) Rx(tx)."""
    return posescript_reference(R_a) @ R_a.T


@pytest.fixture
def posefix(tmp_path):
    root, ps_root, amass = tmp_path / "posefix_release", tmp_path / "posescript_release", tmp_path / "AMASS"
    root.mkdir()
    ps_root.mkdir()
    rng = np.random.default_rng(0)
    seqs = {"CMU/01/01_01_poses.npz": rng.normal(0, 0.3, (6, 156)), "KIT/3/walk_poses.npz": rng.normal(0, 0.3, (2,
                                                                                                                156))}
    seqs["CMU/01/01_01_poses.npz"][1, :3] = aa(ROOT_A)
    seqs["CMU/01/01_01_poses.npz"][5, :3] = aa(ROOT_B)
    seqs["KIT/3/walk_poses.npz"][1, :3] = aa(ROOT_C)
    write_amass(amass, seqs)
    ids = {"10": ["AMASS", "CMU/01/01_01_poses.npz", 1], "11": ["AMASS", "CMU/01/01_01_poses.npz", 5],
           "12": ["AMASS", "KIT/3/walk_poses.npz", 1]}
    (ps_root / "ids_2_dataset_sequence_and_frame_index_100k.json").write_text(json.dumps(ids))
    pairs = [[10, 11], [11, 12], [12, 10], [10, 12]]  # pair id = list index
    (root / "pair_id_2_pose_ids.json").write_text(json.dumps(pairs))
    (root / "train_in_sequence_pair_ids.json").write_text(json.dumps([0]))
    (root / "train_out_sequence_pair_ids.json").write_text(json.dumps([1, 3]))
    (root / "test_in_sequence_pair_ids.json").write_text(json.dumps([]))
    (root / "test_out_sequence_pair_ids.json").write_text(json.dumps([2]))
    (root / "posefix_human_6157.json").write_text(json.dumps({"0": "Turn a bit and raise your left arm.",
                                                              "2": "Bend the knees."}))
    (root / "posefix_paraphrases_4284.json").write_text(json.dumps({"0": ["Raise the left arm while turning."],
                                                                    "1": ["Straighten the back."]}))
    (root / "posefix_auto_135305.json").write_text(json.dumps({"3": "Move the right foot forward."}))
    return str(root), str(amass), str(ps_root / "ids_2_dataset_sequence_and_frame_index_100k.json"), seqs


def test_posefix_pairs_modifiers_and_frames(posefix):
    root, amass, ids, seqs = posefix
    ds = PoseFix(root, amass, ids, "train", seed=1)
    # pair 3 has only an automatic modifier: left out with the default (human, paraphrases), as PoseFix-H/HPP
    assert [p for p, _, _ in ds.ids] == [0, 1] and ds.in_sequence == [True, False]
    assert ds.modifiers[0] == ["Turn a bit and raise your left arm.", "Raise the left arm while turning."]
    a, b = ds.poses_aa(0)
    src_b = seqs["CMU/01/01_01_poses.npz"][5]
    assert np.allclose(mat(a[0]), Y_UP @ posescript_reference(ROOT_A), atol=1e-6)  # A normalised, y-up
    # in-sequence: B turned by A's normalising rotation (PoseFix's R = A' A^-1), keeping the 0.6 turn between them
    assert np.allclose(mat(b[0]), Y_UP @ posefix_normalizer(ROOT_A) @ ROOT_B, atol=1e-6)
    assert not np.allclose(mat(b[0]), Y_UP @ posescript_reference(ROOT_B), atol=1e-3)
    assert np.allclose(b[1:22], src_b[3:66].reshape(21, 3)) and np.allclose(b[22:], 0)
    _, c = ds.poses_aa(1)  # out-of-sequence: B normalised on its own
    assert np.allclose(mat(c[0]), Y_UP @ posescript_reference(ROOT_C), atol=1e-6)
    s = ds[0]
    assert s.task == "pose_edit" and s.text in ds.modifiers[0] and s.text in s.prompt
    assert data.POSE_INPUT_TOKEN in s.prompt and s.answer == data.POSE_ANSWER and s.image is None
    assert np.allclose(s.pose_input, data.pose_aa_to_6d(a[None])[0], atol=1e-6)
    assert np.allclose(s.pose6d, data.pose_aa_to_6d(b[None])[0], atol=1e-6)
    assert ds[0].prompt == s.prompt  # sample i depends on (seed, i) only
    j = PoseFix(root, amass, ids, "train", bodymodel=body.BodyModel()).sample(0).joints
    assert j.shape == (24, 3) and np.allclose(j[0], 0)
    assert PoseFix(root, amass, ids, "train", modifiers=("auto",)).ids == [(3, 10, 12)]
    assert [p for p, _, _ in PoseFix(root, amass, ids, "test", modifiers=("human",)).ids] == [2]
    assert ds.preflight() == []
    tok = vocab.extend_tokenizer(vocab.build_tokenizer([data.POSE_ANSWER, "USER: ASSISTANT:"]), [])
    batch = data.collate([ds[0], ds[1]], tok, num_image_tokens=4)  # the input poses travel in the batch
    assert batch.pose_values.shape == (2, 24, 6) and torch.allclose(batch.pose_values[0], torch.as_tensor(s.pose_input))


def test_posefix_errors_name_dataset_file_record(posefix, tmp_path):
    root, amass, ids, seqs = posefix
    with pytest.raises(FileNotFoundError, match="PoseFix.*posefix_dataset_release"):
        PoseFix(str(tmp_path / "nowhere"), amass, ids)
    with pytest.raises(FileNotFoundError, match="ids_2_dataset.*PoseScript release"):
        PoseFix(root, amass)  # no ids file in the PoseFix folder: pass PoseScript's
    pairs_path = os.path.join(root, "pair_id_2_pose_ids.json")
    with open(pairs_path, "w") as fh:
        json.dump([[10, 11]], fh)  # pair 1 of the split is beyond the file
    with pytest.raises(realdata.DataFormatError, match="pair_id_2_pose_ids.json.*1.*beyond the 1 pairs"):
        PoseFix(root, amass, ids)
    with open(pairs_path, "w") as fh:
        json.dump([[10, 11], [11, "12"]], fh)
    with pytest.raises(realdata.DataFormatError, match=r"record 1.*expected \[pose A id, pose B id\]"):
        PoseFix(root, amass, ids)
    with open(pairs_path, "w") as fh:
        json.dump([[10, 11], [11, 99], [12, 10], [10, 12]], fh)
    with pytest.raises(realdata.DataFormatError, match="99.*missing"):
        PoseFix(root, amass, ids)
    with open(pairs_path, "w") as fh:
        json.dump([[10, 11], [11, 12], [12, 10], [10, 12]], fh)
    with open(os.path.join(root, "posefix_human_6157.json"), "w") as fh:
        json.dump({"x0": "Bend."}, fh)
    with pytest.raises(realdata.DataFormatError, match="posefix_human_6157.json.*x0.*integer pair id"):
        PoseFix(root, amass, ids)
    with open(os.path.join(root, "posefix_human_6157.json"), "w") as fh:
        json.dump({"0": "Bend."}, fh)
    os.remove(os.path.join(amass, "KIT/3/walk_poses.npz"))
    problems = PoseFix(root, amass, ids).preflight()
    assert len(problems) == 1 and "walk_poses.npz" in problems[0] and "not found" in problems[0]


def test_posescript_pose_to_text(tmp_path):
    """PoseScript's captions as pose-to-text: the pose asks at the input placeholder, a caption answers."""
    from test_real_data import posescript as fixture

    root, amass, _ = fixture.__wrapped__(tmp_path)
    ds = realdata.PoseScript(root, amass, "train", seed=1, task="pose_to_text")
    t2p = realdata.PoseScript(root, amass, "train", seed=1)
    s = ds[1]
    assert s.task == "pose_to_text" and s.answer in ds.captions[1] and s.text == s.answer
    assert s.prompt in data.PROMPTS["pose_to_text"] and data.POSE_INPUT_TOKEN in s.prompt and s.pose6d is None
    assert np.allclose(s.pose_input, data.pose_aa_to_6d(t2p.pose_aa(1)[None])[0], atol=1e-6)
    with pytest.raises(ValueError, match="task must be text_to_pose or pose_to_text"):
        realdata.PoseScript(root, amass, task="pose_edit")

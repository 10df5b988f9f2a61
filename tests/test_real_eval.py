"""evaluate.py's real test sets (`evaluate_real`, `--eval_npz` / `--posescript_dir`) on CPU: a toy-width
llava-1.5-7b checkpoint (fake --llava_path, synthetic HMR2.0 .ckpt, an untrained LoRA adapter) on fixture
files in the real schemas (HMR2.0 eval npz + images, PoseScript + AMASS), the procedural SMPL body and a
random 19-row (J19) regressor. Checks the metrics, results files, the sharding and the errors for bad flags."""
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

import body
import evaluate
import evaluate_tasks
import metrics
import model
import plumbing
import presets
import realdata
import retrieval
import tables
from test_real_data import coord_image, save_png
from test_real_model import TOY_VIT, fake_llava_dir, hmr2_state_dict, save_ckpt

N_TEXT = 34  # >= 32: the random-sampling protocol is defined


def hmr2_eval_npz(path, img_dir, n, rng, with_pose=True):
    """An eval npz in 4D-Humans' schema with its images: SMPL poses (record 1 without one) or, with
    with_pose False, none at all. Every record is evaluated either way (HMR2.0's protocol)."""
    for i in range(n):
        save_png(os.path.join(img_dir, f"img_{i}.png"), coord_image() if i % 2 else 255 - coord_image())
    kp3d = np.concatenate([rng.normal(0, 0.3, (n, 19, 3)), np.ones((n, 19, 1))], -1)
    pose = dict(body_pose=rng.normal(0, 0.2, (n, 72)), has_body_pose=np.array([float(i != 1) for i in range(n)]))
    np.savez(path, imgname=np.array([f"img_{i}.png" for i in range(n)]), center=np.tile([100.0, 80.0], (n, 1)),
             scale=np.full(n, 120.0), extra_keypoints_3d=kp3d, **(pose if with_pose else {}))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(dir, the full command line's flags): a run dir, two image sets, PoseScript-H2, regressor, retrievers."""
    d = tmp_path_factory.mktemp("real_eval")
    fake_llava_dir(str(d / "llava"))
    save_ckpt(d / "hmr2.ckpt", hmr2_state_dict())
    base, tok = presets.build_llava_7b(str(d / "llava"), str(d / "hmr2.ckpt"), rank=2, pose_vit=TOY_VIT)
    presets.save_base(base, tok, str(d / "run" / "base"), "llava-1.5-7b")
    presets.apply_lora(base, rank=4).save_pretrained(str(d / "run" / "step-000001" / "adapter"))
    (d / "run" / "LATEST").write_text("step-000001")
    rng = np.random.default_rng(0)
    hmr2_eval_npz(d / "3dpw_test.npz", d / "3DPW", 4, rng)
    hmr2_eval_npz(d / "h36m_val_p2.npz", d / "H36M", 3, rng, with_pose=False)
    ps, amass = d / "posescript", d / "AMASS"
    os.makedirs(amass / "CMU")
    np.savez(amass / "CMU" / "a_poses.npz", poses=rng.normal(0, 0.3, (N_TEXT + 2, 156)))
    ps.mkdir()
    (ps / "ids_2_dataset_sequence_and_frame_index_100k.json").write_text(
        json.dumps({str(i): ["AMASS", "CMU/a_poses.npz", i] for i in range(N_TEXT + 2)}))
    (ps / "test_ids_100k.json").write_text(json.dumps(list(range(N_TEXT + 1))))  # the last has no human caption
    parts = ["left arm", "right arm", "left knee", "right knee", "head", "torso"]
    states = ["bent", "straight", "raised", "lowered", "turned", "forward"]
    (ps / "posescript_human_6293.json").write_text(
        json.dumps({str(i): f"The {parts[i % 6]} is {states[i // 6]}." for i in range(N_TEXT)}))
    reg = rng.random((19, body.BodyModel().num_vertices))  # as SMPL_to_J19.pkl, for the procedural mesh
    np.save(d / "SMPL_to_J19.npy", reg / reg.sum(1, keepdims=True))
    retrieval.save_retriever(retrieval.TextPoseRetriever(retrieval.RetrieverConfig(embed_dim=16, hidden_dim=32)),
                             str(d / "retriever"))
    flags = ["--preset", "llava-1.5-7b", "--ckpt", str(d / "run"), "--threads", "1", "--batch_size", "8",
             "--eval_npz", f"3DPW={d / '3dpw_test.npz'}={d / '3DPW'}", f"H36M={d / 'h36m_val_p2.npz'}={d / 'H36M'}",
             "--joint_regressor", str(d / "SMPL_to_J19.npy"), "--smpl_path", body.procedural_smpl_path(),
             "--posescript_dir", str(ps), "--amass_dir", str(amass),
             "--eval_retriever", str(d / "retriever"), "--reward_retriever", str(d / "retriever")]
    return d, flags


def expected_keys():
    keys = [f"image_to_pose/{s}/{m}" for s in ("3DPW", "H36M") for m in ("mpjpe_mm", "pa_mpjpe_mm")]
    return set(keys + [f"text_to_pose/PoseScript-H2/{r}_retriever/{p}/R{d}@{k}" for r in ("eval", "reward")
                       for p in ("full", "random") for d in ("t2p", "p2t") for k in (5, 10, 20)])


def test_real_eval_from_flags_writes_every_metric(real, capsys):
    d, flags = real
    evaluate.main(flags)
    out = d / "run" / "eval_real"
    rec = tables.load_results(str(out / "results.json"), preset="llava-1.5-7b")
    assert rec["datasets"] == {"image_to_pose/3DPW": 4, "image_to_pose/H36M": 3, "text_to_pose/PoseScript-H2": N_TEXT}
    assert rec["step"] == "step-000001" and rec["world_size"] == 1 and rec["pose"] == "mean"
    assert rec["files"]["3DPW"] == [str(d / "3dpw_test.npz"), str(d / "3DPW")] and rec["max_samples"] == 0
    m = rec["metrics"]
    assert set(m) == expected_keys()
    assert all(v is not None and math.isfinite(v) for v in m.values())
    assert all(0 < v < 5000 for k, v in m.items() if k.endswith("_mm"))
    assert all(0 <= v <= 100 for k, v in m.items() if "@" in k)
    md = (out / "results.md").read_text()
    assert all(f"`{k}`" in md for k in m) and "3DPW (4 samples)" in md and "PoseScript-H2 (34 samples)" in md
    assert "`image_to_pose/3DPW/mpjpe_mm` (mm)" in capsys.readouterr().out
    # the metric is HMR2.0's protocol on the written predictions: SMPL mesh -> 14 LSP joints vs the npz's
    p = np.load(out / "predictions.npz")
    assert p["image_to_pose/H36M/pose6d"].shape == (3, 144) and p["text_to_pose/PoseScript-H2/index"].shape == (N_TEXT,)
    ds = realdata.HMR2ImageDataset("3DPW", str(d / "3dpw_test.npz"), str(d / "3DPW"), require_pose=False)
    verts = body.BodyModel().forward_rot6d(torch.as_tensor(p["image_to_pose/3DPW/pose6d"])).vertices
    pred = realdata.lsp14_from_vertices(verts, np.load(d / "SMPL_to_J19.npy"))
    gt = torch.as_tensor(ds.gt_lsp14())
    assert m["image_to_pose/3DPW/mpjpe_mm"] == pytest.approx(realdata.lsp14_mpjpe_mm(pred, gt).mean().item(), rel=1e-5)
    assert m["image_to_pose/3DPW/pa_mpjpe_mm"] == pytest.approx(metrics.pa_mpjpe_mm(pred, gt).mean().item(), rel=1e-5)


def test_max_samples_and_shards_give_the_same_predictions(real, monkeypatch):
    d, flags = real
    policy, tok, _ = presets.load_policy(str(d / "run"), "llava-1.5-7b")
    (args,) = HfArgumentParser(evaluate.Args).parse_args_into_dataclasses(flags)
    inputs = evaluate.real_eval_inputs(args, "cpu")
    _, full = evaluate_tasks.evaluate_real(policy, tok, batch_size=1, **inputs)
    m, capped = evaluate_tasks.evaluate_real(policy, tok, max_samples=2, batch_size=1, **inputs)
    assert {k: len(v["index"]) for k, v in capped.items()} == dict.fromkeys(full, 2)
    assert m["text_to_pose/PoseScript-H2/eval_retriever/random/Rt2p@5"] is None  # N = 2 < 32
    for k in full:
        assert torch.equal(capped[k]["pose6d"], full[k]["pose6d"][:2]), k
    shards = []  # rank r of 2 takes samples r, r + 2, ...; torchrun's gather interleaves them back
    monkeypatch.setattr(plumbing, "gather_shards", lambda local, world: local)
    for r in range(2):
        monkeypatch.setattr(plumbing, "rank_and_world", lambda r=r: (r, 2))
        shards.append(evaluate_tasks.evaluate_real(policy, tok, batch_size=1, **inputs)[1])
    for k in full:
        assert torch.equal(plumbing.interleave([s[k]["pose6d"] for s in shards]), full[k]["pose6d"]), k


def test_missing_files_and_flags_are_named_before_the_model_loads(real, tmp_path, monkeypatch):
    d, flags = real
    monkeypatch.setattr(presets, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    run = ["--ckpt", str(d / "run"), "--out_dir", str(tmp_path / "out"), "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        evaluate.main([*run, "--eval_npz", f"3DPW={tmp_path / 'none.npz'}={d / '3DPW'}", "H36M=h36m.npz",
                       "--posescript_dir", str(d / "posescript"), "--eval_retriever", str(tmp_path / "retriever_eval")])
    msg = str(e.value.code)
    for text in (f"--eval_npz '{tmp_path / 'none.npz'}': not found; 4D-Humans' hmr2_evaluation_data.tar.gz",
                 "--eval_npz 'H36M=h36m.npz': expected NAME=NPZ=IMAGE_DIR",
                 "--joint_regressor '': not given; SMPL_to_J19.pkl from 4D-Humans' hmr2_data",
                 "--smpl_path '': not given; the regressor reads the licensed SMPL model's mesh, "
                 "https://smpl.is.tue.mpg.de",
                 "--amass_dir '': not given; AMASS in the SMPL+H G format",
                 f"--eval_retriever '{tmp_path / 'retriever_eval'}': not found; train it with `python retrieval.py`",
                 "nothing was loaded"):
        assert text in msg, text
    with pytest.raises(SystemExit, match="no test set: give --eval_npz NAME=NPZ=IMAGE_DIR"):
        evaluate.main(run)  # a llava-1.5-7b checkpoint is never run on posebench
    # files that are there but do not fit: the npz without ground truth, a regressor for another mesh
    np.savez(tmp_path / "no_gt.npz", **{k: v for k,
                                        v in np.load(d / "3dpw_test.npz").items() if k != "extra_keypoints_3d"})
    ok = flags[flags.index("--joint_regressor"):flags.index("--posescript_dir")]
    with pytest.raises(SystemExit, match=r"3DPW: .*no_gt.npz: no extra_keypoints_3d"):
        evaluate.main([*run, "--eval_npz", f"3DPW={tmp_path / 'no_gt.npz'}={d / '3DPW'}", *ok])
    np.save(tmp_path / "reg.npy", np.ones((19, 6890)) / 6890)
    with pytest.raises(SystemExit,
                       match=r"--joint_regressor .*reg.npy reads 6890 vertices but --smpl_path .* has 1456"):
        evaluate.main([*run, *flags[flags.index("--eval_npz"):flags.index("--joint_regressor")],
                       "--joint_regressor", str(tmp_path / "reg.npy"), "--smpl_path", body.procedural_smpl_path()])
    # SPIN's H36M regressor: not the J19 ground truth's joints
    np.save(tmp_path / "h36m.npy", np.ones((17, 1456)) / 1456)
    with pytest.raises(SystemExit, match=r"--joint_regressor .*h36m.npy regresses 17 joints; .* Pass SMPL_to_J19.pkl"):
        evaluate.main([*run, *flags[flags.index("--eval_npz"):flags.index("--joint_regressor")],
                       "--joint_regressor", str(tmp_path / "h36m.npy"), "--smpl_path", body.procedural_smpl_path()])
    (tmp_path / "no_images").mkdir()  # the images of another set, or none: named by record before any evaluation
    with pytest.raises(SystemExit, match=r"3DPW: .*no_images/img_0.png, record 0: image not found \(4 of the 4"):
        evaluate.main([*run, "--eval_npz", f"3DPW={d / '3dpw_test.npz'}={tmp_path / 'no_images'}", *ok])
    assert not (tmp_path / "out").exists()

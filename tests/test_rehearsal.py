"""The README's real-run commands (and docs/REAL_RUNS.md's), rehearsed end to end on CPU under
`torchrun --nproc_per_node 2` (gloo): the same commands and flags but for paths and sizes, on
miniature assets in each real schema, all made here:

- LLaVA: a tiny LLaMA + CLIP saved by transformers' save_pretrained (llava-hf's file layout) with a
  subword (BPE) tokenizer trained here, in LLaMA's form, holding LLaVA's special tokens;
- an HMR2.0-shaped Lightning checkpoint (toy width: train_sft.py runs through tests/toy_width.py);
- the procedural SMPL file (SMPL's pickle format) as --smpl_path;
- PoseScript V2 + AMASS SMPL+H G npz, BEDLAM-Script as PoseEmbroider's processing writes it (with
  images), SPIN's mpi_inf_3dhp_train.npz with images, LLaVA-Instruct-150k with COCO-style images,
  and a 3DPW-format eval npz (4D-Humans' hmr2_evaluation_data) with images and a J19 regressor.

Then: SFT of the llava-1.5-7b preset, both retrievers on the real-schema fixtures, RFT (both with
--grad_accum 2 --num_workers 2 --keep_checkpoints 2), evaluate.py on the 3DPW-format npz and
PoseScript-H2, and export.py of the RFT run. Minutes on CPU: marked slow, run by .ci/run.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import body
import data
import realdata
from test_data import llama_style_tokenizer
from test_real_eval import hmr2_eval_npz
from test_real_model import fake_llava_dir, hmr2_state_dict, save_ckpt
from test_retrieval import captioned_poses, write_bedlam_script, write_posescript_release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_assets(d) -> dict:
    """Every asset of the README's commands under d, in its published layout; returns their paths."""
    rng = np.random.default_rng(0)
    p = {k: str(d / v) for k, v in dict(
        llava="models/llava-1.5-7b-hf", hmr2="models/4DHumans/epoch=35-step=1000000.ckpt",
        smpl="models/SMPL_NEUTRAL.pkl", regressor="models/SMPL_to_J19.npy", posescript="data/posescript_release",
        amass="data/AMASS/smplh", bedlam="data/bedlam_processed", bedlam_img="data/bedlam",
        npz="data/npz/mpi_inf_3dhp_train.npz", h3dp="data/3dhp", instruct="data/llava_instruct_150k.json",
        coco="data/coco/train2017", eval_npz="data/hmr2_evaluation_data/3dpw_test.npz", pw3d="data/3DPW").items()}
    train, test, bedlam = captioned_poses(16, 1), captioned_poses(8, 2), captioned_poses(8, 3)
    write_posescript_release(p["posescript"], p["amass"], train, test, rng)
    write_bedlam_script(p["bedlam"], bedlam, rng, img_dir=p["bedlam_img"])
    os.makedirs(p["h3dp"])
    n = 4  # SPIN's MPI-INF-3DHP training npz: its names, scale = box / 200, SMPL poses in every record
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)).save(os.path.join(p["h3dp"], f"{i}.jpg"))
    os.makedirs(os.path.dirname(p["npz"]))
    np.savez(p["npz"], imgname=np.array([f"{i}.jpg" for i in range(n)]), center=np.tile([50.0, 60.0], (n, 1)),
             scale=np.full(n, 0.5), pose=rng.normal(0, 0.2, (n, 72)), shape=np.zeros((n, 10)), has_smpl=np.ones(n),
             part=np.zeros((n, 24, 3)))
    os.makedirs(p["coco"])
    records = []
    for i, (q, a) in enumerate([("Is the person standing?", "Yes, the person is standing upright."),
                                ("What is the person doing?", "The person raises the left arm.")]):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(os.path.join(p["coco"], name))
        records.append({"id": f"{i + 1:012d}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    with open(p["instruct"], "w") as fh:
        json.dump(records, fh)
    os.makedirs(os.path.dirname(p["eval_npz"]))
    hmr2_eval_npz(p["eval_npz"], p["pw3d"], 4, rng)
    os.makedirs(os.path.dirname(p["hmr2"]))
    shutil.copy(body.procedural_smpl_path(), p["smpl"])
    reg = rng.random((19, body.BodyModel().num_vertices))  # as SMPL_to_J19.pkl, for the procedural mesh
    np.save(p["regressor"], reg / reg.sum(1, keepdims=True))
    save_ckpt(p["hmr2"], hmr2_state_dict())
    texts = [c for caps in train[1] + test[1] + bedlam[1] for c in caps] + [r["conversations"][k]["value"]
                                                                            for r in records for k in (0, 1)]
    texts += [t for ps in data.PROMPTS.values() for t in ps] + [data.chat_text(realdata.DESCRIBE_PROMPT,
                                                                               data.POSE_ANSWER)]
    fake_llava_dir(p["llava"], text=dict(max_position_embeddings=1024), tokenizer=llama_style_tokenizer(texts,
                                                                                                        "legacy"))
    return p


@pytest.mark.slow
def test_readme_real_run_commands_under_torchrun(tmp_path):
    p = write_assets(tmp_path)
    data_flags = ["--posescript_dir", p["posescript"], "--amass_dir", p["amass"],
                  "--image_npz", f"MPI-INF-3DHP={p['npz']}={p['h3dp']}",
                  "--bedlam_script_dir", p["bedlam"], "--bedlam_img_dir", p["bedlam_img"],
                  "--llava_instruct_json", p["instruct"], "--coco_dir", p["coco"], "--smpl_path", p["smpl"]]
    small = ["--threads", "1", "--lora_rank", "4", "--log_every", "1", "--warmup_steps", "1"]
    accum = ["--grad_accum", "2", "--num_workers", "2", "--keep_checkpoints", "2"]  # the paper's hardware flags
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]

    def run(cmd):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, " ".join(cmd) + "\n" + r.stdout[-3000:] + r.stderr[-6000:]
        return r.stdout

    run([*torchrun, os.path.join(ROOT, "tests", "toy_width.py"), os.path.join(ROOT, "train_sft.py"),
         "--preset", "llava-1.5-7b", "--out_dir", "ckpt/sft_7b", "--llava_path", p["llava"], "--hmr2_ckpt", p["hmr2"],
         *data_flags, "--steps", "3", "--batch_size", "4", "--head_rank", "2", "--save_every", "1", *accum, *small])
    out = run([sys.executable, os.path.join(ROOT, "retrieval.py"), "--posescript_dir", p["posescript"],
               "--amass_dir", p["amass"], "--bedlam_script_dir", p["bedlam"], "--smpl_path", p["smpl"],
               "--epochs", "2", "--batch_size", "8", "--hidden_dim", "32", "--embed_dim", "16", "--num_threads", "1"])
    assert "PoseScript-H2" in out
    run([*torchrun, os.path.join(ROOT, "train_rft.py"), "--preset", "llava-1.5-7b", "--sft_dir", "ckpt/sft_7b",
         "--out_dir", "ckpt/rft_7b", *data_flags, "--steps", "2", "--batch_size", "4", "--group_size", "2",
         "--max_new_tokens", "4", "--save_every", "1", *accum, *small])
    run([*torchrun, os.path.join(ROOT, "evaluate.py"), "--preset", "llava-1.5-7b", "--ckpt", "ckpt/rft_7b",
         "--eval_npz", f"3DPW={p['eval_npz']}={p['pw3d']}", "--joint_regressor", p["regressor"],
         "--smpl_path", p["smpl"],
         "--posescript_dir", p["posescript"], "--amass_dir", p["amass"], "--eval_retriever", "ckpt/retriever_eval",
         "--reward_retriever", "ckpt/retriever_reward", "--threads", "1", "--batch_size", "4"])
    run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", "ckpt/rft_7b", "--out", "exported/rft_7b"])
    assert (tmp_path / "exported/rft_7b/config.json").exists()
    for run_dir, steps in (("ckpt/sft_7b", ["step-000002", "step-000003"]), ("ckpt/rft_7b", ["step-000001",
                                                                                             "step-000002"])):
        assert sorted(x.name for x in (tmp_path / run_dir).glob("step-*")) == steps  # --keep_checkpoints 2
    assert (tmp_path / "ckpt/rft_7b/base").is_symlink()  # no second base model
    sft = [json.loads(x) for x in (tmp_path / "ckpt/sft_7b/metrics.jsonl").read_text().splitlines()]
    assert sum("losses/total" in r for r in sft) == 3
    assert all(np.isfinite(r["losses/total"]) for r in sft if "losses/total" in r)
    rft = [json.loads(x) for x in (tmp_path / "ckpt/rft_7b/metrics.jsonl").read_text().splitlines()]
    assert any("losses/total" in r and np.isfinite(r["losses/total"]) for r in rft)
    res = json.loads((tmp_path / "ckpt/rft_7b/eval_real/results.json").read_text())
    assert res["world_size"] == 2 and res["datasets"] == {"image_to_pose/3DPW": 4, "text_to_pose/PoseScript-H2": 8}
    m = res["metrics"]
    assert np.isfinite(m["image_to_pose/3DPW/mpjpe_mm"])
    assert 0 <= m["text_to_pose/PoseScript-H2/eval_retriever/full/Rt2p@5"] <= 100

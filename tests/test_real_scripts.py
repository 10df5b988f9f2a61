"""train_sft.py / train_rft.py with --preset llava-1.5-7b: --help documents every path flag, missing
assets stop the scripts at once naming flag and source, Table 4's preset defaults apply only to
flags not given, and one SFT step + one HyGRPO step run end to end on CPU on the toy-width
architecture (fake --llava_path, synthetic HMR2.0 .ckpt, fixture data in the real schemas)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import HfArgumentParser

import body
import data
import posevit
import presets
import realdata
import train_rft
import train_sft
from test_real_model import CLIP_SIZE, TOY_VIT, fake_llava_dir, hmr2_state_dict, save_ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_PATH_FLAGS = ("--llava_path", "--hmr2_ckpt", "--smpl_path", "--posescript_dir", "--amass_dir", "--image_npz",
                  "--bedlam_script_dir", "--bedlam_img_dir", "--llava_instruct_json", "--coco_dir", "--out_dir")
RFT_PATH_FLAGS = ("--sft_dir", "--reward_retriever", "--eval_retriever", "--text_encoder", "--smpl_path",
                  "--posescript_dir", "--amass_dir", "--image_npz", "--bedlam_script_dir", "--bedlam_img_dir",
                  "--llava_instruct_json", "--coco_dir", "--out_dir")


def run(script, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("main,flags,sources", [
    (train_sft.main, SFT_PATH_FLAGS, ("llava-hf/llava-1.5-7b-hf", "epoch=35-step=1000000.ckpt", "PoseScript",
                                      "amass.is.tue.mpg.de", "LLaVA-Instruct-150K", "hmr2_evaluation_data")),
    (train_rft.main, RFT_PATH_FLAGS, ("retrieval.py", "bge-m3", "smpl.is.tue.mpg.de", "PoseScript"))])
def test_help_documents_every_path_flag_and_table4(main, flags, sources, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "llava-1.5-7b", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in flags:
        assert flag in out, flag
    for src in sources:
        assert src.replace(" ", "") in out.replace(" ", ""), src
    assert "llava-1.5-7b 1000" in out and "(Table 4)" in out and "applied only to flags not given" in out


def test_missing_assets_stop_at_once_naming_flag_and_source(tmp_path):
    r = run("train_sft.py", "--preset", "llava-1.5-7b", "--out_dir", str(tmp_path / "sft"),  # the real command line
            "--hmr2_ckpt", str(tmp_path / "none.ckpt"), "--posescript_dir", str(tmp_path))
    assert r.returncode != 0
    err = r.stderr
    assert "--llava_path '': not given; the Hugging Face repository llava-hf/llava-1.5-7b-hf" in err
    assert f"--hmr2_ckpt '{tmp_path / 'none.ckpt'}': not found; 4D-Humans" in err
    assert "--amass_dir '': not given; AMASS in the SMPL+H G format" in err
    assert "nothing was loaded" in err and not (tmp_path / "sft" / "base").exists()
    with pytest.raises(SystemExit) as e:
        train_rft.main(["--preset", "llava-1.5-7b", "--out_dir", str(tmp_path / "rft"), "--sft_dir",
                        str(tmp_path / "sft"),
                        "--image_npz", "H36M=a.npz", "--reward_retriever", str(tmp_path / "retriever_reward")])
    for text in ("--smpl_path '': not given; the joint reward (Eq. 7) needs the licensed SMPL model",
                 "--sft_dir", "train_sft.py --preset llava-1.5-7b",
                 "--image_npz 'H36M=a.npz': expected NAME=NPZ=IMAGE_DIR",
                 f"--reward_retriever '{tmp_path / 'retriever_reward'}': not found; "
                 "train it with `python retrieval.py`"):
        assert text in str(e.value.code), text
    assert not (tmp_path / "rft").exists()


def test_table4_defaults_only_where_not_given():
    a = train_sft.Args(preset="llava-1.5-7b")
    assert (a.steps, a.batch_size, a.lr, a.eval_samples) == (10000, 80, 3e-4, 0)
    assert (train_sft.Args().steps, train_sft.Args().batch_size, train_sft.Args().lr) == (1200, 32, 1e-3)
    (b,) = HfArgumentParser(train_sft.Args).parse_args_into_dataclasses(["--preset", "llava-1.5-7b", "--lr", "1e-5"])
    assert (b.lr, b.steps, b.batch_size) == (1e-5, 10000, 80)
    r = train_rft.Args(preset="llava-1.5-7b")
    assert (r.steps, r.batch_size, r.lr) == (1000, 16, 1e-6)
    (r2,) = HfArgumentParser(train_rft.Args).parse_args_into_dataclasses(["--preset", "llava-1.5-7b", "--steps", "3"])
    assert (r2.steps, r2.batch_size) == (3, 16) and train_rft.Args().lr == 1e-4


# ---- end to end on the toy-width architecture ----------------------------------------------------

def write_real_assets(d, llava=None, hmr2=None):
    """Fake --llava_path and HMR2.0 checkpoint (toy sizes, or those of `llava` / `hmr2`: keyword
    arguments of fake_llava_dir / hmr2_state_dict), fixture data in each dataset's real schema and an
    untrained reward retriever, in directory d. Returns the data flags of both scripts."""
    from PIL import Image

    fake_llava_dir(str(d / "llava"), **(llava or {}))
    save_ckpt(d / "hmr2.ckpt", hmr2_state_dict(**(hmr2 or {})))
    rng = np.random.default_rng(0)
    # PoseScript + AMASS
    ps, amass = d / "posescript", d / "amass"
    ps.mkdir()
    os.makedirs(amass / "CMU")
    np.savez(amass / "CMU" / "a_poses.npz", poses=rng.normal(0, 0.3, (4, 156)))
    (ps / "ids_2_dataset_sequence_and_frame_index_100k.json").write_text(
        json.dumps({str(i): ["AMASS", "CMU/a_poses.npz", i] for i in range(4)}))
    (ps / "train_ids_100k.json").write_text("[0, 1, 2, 3]")
    (ps / "posescript_human_6293.json").write_text(json.dumps({"0": "The left arm is straight."}))
    (ps / "posescript_auto_100k.json").write_text(json.dumps({str(i): ["The person is standing."] for i in range(4)}))
    # an HMR2.0-style npz with two images
    os.makedirs(d / "h36m")
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(d / "h36m" / f"im{i}.jpg")
    np.savez(d / "h36m_train.npz", imgname=np.array(["im0.jpg", "im1.jpg"]), center=np.array([[30.0, 40], [30, 40]]),
             scale=np.array([60.0, 50.0]), body_pose=rng.normal(0, 0.2, (2, 72)), has_body_pose=np.ones(2),
             betas=np.zeros((2, 10)))
    # LLaVA-Instruct with one COCO image
    os.makedirs(d / "coco")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / "coco" / "1.jpg")
    (d / "llava_instruct_150k.json").write_text(json.dumps([{"id": "1", "image": "1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs the left arm straight?"},
        {"from": "gpt", "value": "Yes, the left arm is straight."}]}]))
    # an untrained reward retriever (as tools/step_timing.py uses)
    import retrieval
    retrieval.save_retriever(retrieval.TextPoseRetriever(retrieval.RetrieverConfig(embed_dim=16, hidden_dim=32)),
                             str(d / "retriever"))
    data_flags = ["--posescript_dir", str(ps), "--amass_dir", str(amass),
                  "--image_npz", f"H36M={d / 'h36m_train.npz'}={d / 'h36m'}",
                  "--llava_instruct_json", str(d / "llava_instruct_150k.json"), "--coco_dir", str(d / "coco"),
                  "--threads", "1", "--lora_rank", "4"]
    return data_flags


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_assets")
    return d, write_real_assets(d)


def test_llava_7b_sft_then_rft_run_end_to_end(assets, monkeypatch, capsys):
    d, data_flags = assets
    monkeypatch.setattr(posevit, "VIT_H", TOY_VIT)  # the toy-width pose ViT of the synthetic checkpoint
    train_sft.main(["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
                    "--out_dir", str(d / "sft"), "--steps", "2", "--batch_size", "3", "--warmup_steps", "1",
                    "--log_every", "1", "--head_rank", "2", *data_flags])
    assert "no posebench evaluation for llava-1.5-7b" in capsys.readouterr().out
    assert json.load(open(d / "sft" / "base" / "preset.json"))["preset"] == "llava-1.5-7b"
    rows = [json.loads(x) for x in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["losses/total"]) for r in rows)
    assert (d / "sft" / "LATEST").read_text() == "step-000002"
    base, _, _ = presets.load_base(str(d / "sft" / "base"))
    assert base.num_image_tokens == (CLIP_SIZE // 14) ** 2 + 12 and base.config.compute_dtype == "bfloat16"
    train_rft.main(["--preset", "llava-1.5-7b", "--sft_dir", str(d / "sft"), "--out_dir", str(d / "rft"),
                    "--smpl_path", body.procedural_smpl_path(), "--reward_retriever", str(d / "retriever"),
                    "--eval_retriever", str(d / "retriever"), "--steps", "1", "--batch_size", "2", "--group_size", "2",
                    "--max_new_tokens", "4", "--log_every", "1", "--warmup_steps", "1", *data_flags])
    rows = [json.loads(x) for x in (d / "rft" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "losses/total" in r]
    assert len(step) == 1 and np.isfinite(step[0]["losses/total"]) and "charts/pose_std_mean" in step[0]
    # no second base model: base/ links to the SFT run's, beside a copy of the SFT adapter (pi_ref)
    assert os.path.realpath(d / "rft" / "base") == os.path.realpath(d / "sft" / "base")
    assert (d / "rft" / presets.REFERENCE / "adapter_model.safetensors").exists()


def test_llava_7b_sft_with_the_pose_input_tasks(assets, monkeypatch, tmp_path):
    """--real_mix with 6 weights: PoseScript's captions as pose-to-text and a PoseFix release (its pose ids from the
    PoseScript release's file) train the 7B preset with the pose encoder; RFT refuses them, saying why."""
    d, data_flags = assets
    monkeypatch.setattr(posevit, "VIT_H", TOY_VIT)
    pf = tmp_path / "posefix_release"
    pf.mkdir()
    (pf / "pair_id_2_pose_ids.json").write_text(json.dumps([[0, 1], [2, 3]]))
    (pf / "train_in_sequence_pair_ids.json").write_text("[0, 1]")
    (pf / "train_out_sequence_pair_ids.json").write_text("[]")
    (pf / "posefix_human_6157.json").write_text(json.dumps({"0": "Raise the left arm.", "1": "Bend the right knee."}))
    (pf / "posefix_paraphrases_4284.json").write_text("{}")
    flags = ["--real_mix", "0", "0", "0", "0", "0.5", "0.5", "--posefix_dir", str(pf), *data_flags]
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(train_sft.Args).parse_args_into_dataclasses(
        ["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"), *flags])
    mixture = realdata.preflight_real(args, "sft", 0)
    drawn = {mixture[i].task for i in range(40)}
    assert drawn == {"pose_to_text", "pose_edit"}  # the zero-weight kinds are never drawn
    train_sft.main(["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
                    "--out_dir", str(tmp_path / "sft"), "--steps", "2", "--batch_size", "4", "--warmup_steps", "1",
                    "--log_every", "1", "--head_rank", "2", *flags])
    base, tok, _ = presets.load_base(str(tmp_path / "sft" / "base"))
    assert base.config.pose_input_tokens == data.POSE_INPUT_LEN and data.POSE_INPUT_TOKEN in tok.get_vocab()
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["losses/total"]) for r in rows)
    with pytest.raises(SystemExit, match="pose-input tasks on real data are trained by train_sft.py only"):
        train_rft.main(["--preset", "llava-1.5-7b", "--sft_dir", str(tmp_path / "sft"), "--out_dir",
                        str(tmp_path / "rft"), *flags])
    with pytest.raises(SystemExit, match="pose editing needs --real_mix with 6 weights"):
        train_sft.main(["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt",
                        str(d / "hmr2.ckpt"), "--out_dir", str(tmp_path / "sft4"), "--posefix_dir", str(pf),
                        *data_flags])
    assert not (tmp_path / "sft4").exists() and not (tmp_path / "rft").exists()


def test_real_data_loader_workers_and_resume_exact(assets, monkeypatch):
    """The real data through the DataLoader: 2 worker processes and 2 micro-batches a step, stopped after
    step 1 and resumed, give step 2's weights and optimizer state bit for bit as the uninterrupted run
    read in the main process."""
    import torch
    from safetensors.torch import load_file

    d, data_flags = assets
    monkeypatch.setattr(posevit, "VIT_H", TOY_VIT)
    sft = ["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
           "--steps", "2", "--batch_size", "4", "--grad_accum", "2", "--warmup_steps", "1", "--head_rank", "2",
           "--save_every", "1", "--keep_checkpoints", "0", *data_flags]
    train_sft.main(sft + ["--out_dir", str(d / "whole"), "--num_workers", "0"])
    train_sft.main(sft + ["--out_dir", str(d / "parts"), "--num_workers", "2", "--stop_after", "1"])
    assert (d / "parts" / "LATEST").read_text() == "step-000001"
    train_sft.main(sft + ["--out_dir", str(d / "parts"), "--num_workers", "2", "--resume"])
    for step in ("step-000001", "step-000002"):
        a = load_file(d / "whole" / step / "adapter" / "adapter_model.safetensors")
        b = load_file(d / "parts" / step / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        sa, sb = (torch.load(x / step / "train_state.pt", weights_only=False)["optimizer"]["state"]
                  for x in (d / "whole", d / "parts"))
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in ("exp_avg", "exp_avg_sq")), step
    w1 = load_file(d / "whole" / "step-000001" / "adapter" / "adapter_model.safetensors")
    w2 = load_file(d / "whole" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # step 2 trained: the comparison can fail


def test_memory_table_counts_and_arithmetic(capsys):
    from tools import gpu_memory

    rows, peaks = gpu_memory.main([])
    out = capsys.readouterr().out
    assert "| **SFT peak** |" in out and "visual tokens per image 768" in out  # 576 CLIP + 16 x 12 ViT-H
    counts = gpu_memory.count_parameters(gpu_memory.llava_7b_config(), lora_rank=16)
    assert abs(counts["language model + LM head"] - 6.74e9) < 0.01e9  # Llama-2-7B with LLaVA's 32064-token vocabulary
    assert abs(counts["HMR2.0 ViT-H (f_b)"] - 631e6) < 1e6 and abs(counts["CLIP ViT-L/14-336 (f_a)"] - 303.5e6) < 1e6
    assert counts["LoRA"] == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # q k v o + gate up down, r = 16
    by = {(p, i): b for p, i, _, b in rows}
    tok = 10 * (768 + 48)  # SFT: 80 / 8 samples of 816 tokens
    assert by[("SFT", "layer inputs kept by checkpointing")] == 32 * 4096 * 2 * tok
    assert peaks["SFT peak"] == sum(b for p, _, _, b in rows if p in ("both", "SFT"))


def test_memory_takes_grad_accum_and_measured_text_length(assets, capsys):
    """tools/gpu_memory.py --grad_accum N: a GPU holds batch / (gpus x N) samples; --llava_instruct_json: the
    text length is the file's longest turn as data.collate encodes it (counted here by collate itself)."""
    import data
    from tools import gpu_memory
    import realdata
    from transformers import AutoTokenizer

    d, _ = assets
    rows, _ = gpu_memory.main(["--gpus", "4", "--grad_accum", "2"])
    by = {(p, i): b for p, i, _, b in rows}
    assert by[("SFT", "layer inputs kept by checkpointing")] == 32 * 4096 * 2 * 10 * (768 + 48)  # 80 / (4 x 2)
    assert by[("RFT update", "layer inputs kept by checkpointing")] == 32 * 4096 * 2 * 16 * (768 + 48 + 24)  # 2 x G
    args = gpu_memory.Args(llava_path=str(d / "llava"), llava_instruct_json=str(d / "llava_instruct_150k.json"))
    rows, _, counts = gpu_memory.memory_rows(args)
    tok = AutoTokenizer.from_pretrained(str(d / "llava"))
    sample = realdata.LLaVAInstruct(str(d / "llava_instruct_150k.json"), str(d / "coco"), 32)[0]
    b = data.collate([sample], tok, 1)  # one image placeholder: the rest is text
    want = b.input_ids.shape[1] - 1
    assert f"--text_tokens {want}" in capsys.readouterr().out
    assert args.text_tokens == want
    h, L = gpu_memory.llava_7b_config(str(d / "llava")).text_config.hidden_size, gpu_memory.llava_7b_config(
        str(d / "llava")).text_config.num_hidden_layers
    by = {(p, i): n for p, i, _, n in rows}
    assert by[("SFT", "layer inputs kept by checkpointing")] == L * h * 2 * 10 * (counts["num_image_tokens"] + want)
    with pytest.raises(SystemExit, match="divisible by --gpus"):
        gpu_memory.main(["--gpus", "3"])

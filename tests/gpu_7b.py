"""The paper's configuration (the llava-1.5-7b preset) at full size on one GPU, with random weights.

No real asset is needed: this writes LLaVA-1.5-7B-shaped weights (Vicuna-7B's and CLIP ViT-L/14-336's
configurations, transformers' LLaVA format, 32064-token vocabulary, a word-level tokenizer), an
HMR2.0-shaped ViT-H Lightning checkpoint, and the fixture data of tests/test_real_scripts.py (each
dataset's real schema). Then it runs train_sft.py and train_rft.py on them, with Table 4's batch per
GPU of an 8-GPU node: SFT 80 / 8 = 10 samples, RFT 16 / 8 = 2 prompts x G = 8 samples. It prints each
step's time and the peak GPU memory allocated, next to tools/gpu_memory.py's computed peaks. Every sample is an
image-to-pose sample (`--real_mix 0 1 0 0`), the longest kind, as tools/gpu_memory.py assumes.

What it measures is the code path, the speed and the memory; the losses and rewards of random
weights mean nothing. The fixture's texts are short (a word-level tokenizer), so a sample has about
the 768 visual tokens and fewer text tokens than tools/gpu_memory.py's 48.

Run (on a GPU; about 35 GB of disk; 164 s on one H200, 2026-12-01):
    python tests/gpu_7b.py --dir /tmp/gpu_7b
    python tests/gpu_7b.py --dir /tmp/gpu_7b_toy --toy    # toy sizes, any device: checks this script
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import body  # noqa: E402
from tools import gpu_memory  # noqa: E402
import posevit  # noqa: E402
import train_rft  # noqa: E402
import train_sft  # noqa: E402
from test_real_model import TOY_VIT  # noqa: E402
from test_real_scripts import write_real_assets  # noqa: E402

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf's config.json, as gpu_memory.llava_7b_config) and HMR2.0's ViT-H
LLAVA_7B = dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32064),
                vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, projection_dim=768))
VIT_H_CKPT = dict(dim=posevit.VIT_H["dim"], depth=posevit.VIT_H["depth"], grid=(16, 12))


def rows(path: str, key: str) -> list:
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if key in r]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="working directory (emptied first)")
    p.add_argument("--toy", action="store_true", help="toy sizes (checks this script on any device)")
    p.add_argument("--steps", type=int, default=3, help="SFT and RFT steps each (the first one warms up)")
    p.add_argument("--threads", type=int, default=8, help="torch CPU threads")
    a = p.parse_args(argv)
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    d = Path(a.dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    if a.toy:
        posevit.VIT_H = TOY_VIT  # build_llava_7b's default pose ViT, as tests/test_real_scripts.py
        flags = write_real_assets(d)
    else:
        flags = write_real_assets(d, llava=dict(LLAVA_7B, device=device), hmr2=VIT_H_CKPT)
        torch.cuda.empty_cache()
    t_assets = time.time() - t0
    print(f"assets written in {t_assets:.0f} s", flush=True)
    common = [*flags, "--threads", str(a.threads), "--lora_rank", "16", "--log_every", "1", "--warmup_steps", "1",
              "--steps", str(a.steps), "--real_mix", "0", "1", "0", "0"]  # image-to-pose only: the longest samples
    t0 = time.time()
    train_sft.main(["--preset", "llava-1.5-7b", "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
                    "--out_dir", str(d / "sft"), "--batch_size", "10", *common])
    t_sft = time.time() - t0
    shutil.rmtree(d / "llava")  # disk: the SFT run keeps its own copy of the base
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train_rft.main(["--preset", "llava-1.5-7b", "--sft_dir", str(d / "sft"), "--out_dir", str(d / "rft"),
                    "--smpl_path", body.procedural_smpl_path(), "--reward_retriever", str(d / "retriever"),
                    "--eval_retriever", str(d / "retriever"), "--batch_size", "2", "--group_size", "8",
                    "--max_new_tokens", "24", *common])
    t_rft = time.time() - t0

    sft = rows(str(d / "sft" / "metrics.jsonl"), "losses/total")
    rft = rows(str(d / "rft" / "metrics.jsonl"), "losses/total")
    _, computed = gpu_memory.main([])
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "toy": a.toy,
           "seconds": {"assets": t_assets, "sft_script": t_sft, "rft_script": t_rft},
           "sft": [{k: r.get(k) for k in ("step", "losses/total", "charts/steps_per_s", "charts/gpu_peak_gib")}
                   for r in sft],
           "rft": [{k: v for k, v in r.items() if k.startswith("time/") or k in ("step", "losses/total",
                                                                                  "charts/gpu_peak_gib")}
                   for r in rft],
           "memory_py_computed_gib": {k: v / gpu_memory.GIB for k, v in computed.items()}}
    with open(d / "summary.json", "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

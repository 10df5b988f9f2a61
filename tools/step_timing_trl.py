"""TRL's GRPOTrainer and our `--hybrid false` step (train_rft.hygrpo_step) side by side, in one process.

Optional: needs `trl`, installed without touching torch, transformers or peft:
    pip install --no-deps -r requirements-trl.txt

The same work on both sides:
  - the tiny preset's model (presets.build_tiny, vocab.tiny_tokenizer), fresh and with the same initial weights, with
    the same LoRA (presets.lora_config: ours through presets.apply_lora, TRL's through its `peft_config`) but for one
    row: TRL's log-probs go through its fused LM head, which reads `lm_head.weight` and `.bias` directly and fails
    on peft's trainable-token wrapper, so TRL's adapter leaves the LM head's `<POSE>` row frozen (ours trains it:
    a little more work on our side). The reference policy is the model with the adapter disabled on both sides;
  - the same text-to-pose prompts (data.PoseBenchTasks, text only), the same ones in the same order, B prompts x G
    samples a step, at most `max_new_tokens` new tokens at temperature 1. TRL reads a prompt as the text
    bos + data.chat_text, the ids data.collate gives ours (tests/test_step_timing_trl.py checks it). A fresh model's
    answers are random and mostly run to the limit: the mean answer length of each side is printed;
  - the same loss: one iteration (the old log-probs are the policy's own, detached: no extra forward), per-token
    clipped ratio at epsilon 0.2 averaged per answer then over the B x G answers (TRL's loss_type "grpo"), k3 KL
    at beta, group-normalised advantages; AdamW (betas 0.9, 0.95, no weight decay) at a constant learning rate,
    gradients clipped at norm 1;
  - the same text reward: the format reward (rewards.format_reward on the answer decoded and cut at eos as
    rewards.score does), the only reward the `--hybrid false` loss uses on these prompts (Eq. 10 is scored on
    QA prompts only). Our step runs as train_rft.py runs the steps it does not log, which skip the pose rewards
    that a `--hybrid false` loss does not use;
  - float32, no gradient checkpointing, no vLLM, no logging, no evaluation, no saving, `threads` torch threads.
Known differences, each too small to time: our sampler also suppresses the pad and bos tokens (TRL's `generate`
only the image token, which PoseLlava's `generate` adds), and TRL's advantage adds 1e-4 to the group std, ours 1e-6.

The two sides take turns, step by step, so that both see the same load on a shared machine: TRL's trainer runs its
loop, and after each of its steps (a callback, outside TRL's timing) our step runs on the same prompts. The first
`warmup` steps of each side are not timed. Printed: the median step time and the median of each part, and the ratio
ours / TRL of the medians. Our parts are hygrpo_step's own `time/*`; TRL's come from timing its methods on the
trainer (nothing of TRL is changed): generate = `_generate` (tokenize, `generate`, decode), rewards =
`_calculate_rewards`, reference = `_get_per_token_logps_and_entropies` without gradient, policy = `training_step`
less its `_prepare_inputs` (forward, loss, backward), optimizer = from the end of `training_step` to the optimizer
step's callback (gradient clipping and the step). A step is one iteration of the loop: ours as
tools/step_timing.py times it, TRL's from one `on_step_end` callback to the next, less our step in between (so
its data loading and bookkeeping count). "other" is the step less its parts (the median of that difference,
like every column).

Run:
    python tools/step_timing_trl.py   # B 8 x G 8, 24 new tokens, beta 0.04, 20 timed steps a side after 2, 1 thread
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
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
import retrieval
import rewards
import rollout
import train_rft
import vocab

PARTS = ("generate", "rewards", "reference", "policy", "optimizer")


@dataclass
class Args:
    batch_size: int = field(default=8, metadata={"help": "prompts per step, B"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt, G"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest sampled answer"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (constant)"})
    steps: int = field(default=20, metadata={"help": "timed steps a side"})
    warmup: int = field(default=2, metadata={"help": "untimed steps a side, before the timed ones"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    n_train: int = field(default=20000, metadata={"help": "posebench training poses (prompts are drawn from them)"})
    seed: int = field(default=0, metadata={"help": "seed of the model's initial weights"})


def prompts(args: Args, cfg: posebench.BenchConfig | None = None):
    """The tokenizer and the text-to-pose samples of every step, (warmup + steps) * B of them, in order."""
    cfg = cfg or posebench.BenchConfig(n_train=args.n_train)
    tasks = data.PoseBenchTasks("train", cfg, tasks=("text_to_pose",), mix=(1.0,))
    return vocab.tiny_tokenizer(cfg), [tasks[i] for i in range((args.warmup + args.steps) * args.batch_size)]


def trl_prompt(tok, sample: data.Sample) -> str:
    """A sample's prompt as TRL reads it (plain text, which its tokenizer call encodes): the ids of data.collate."""
    return tok.bos_token + data.chat_text(sample.prompt, None)


def our_step(tok, samples, args: Args):
    """Our step as tools/step_timing.py runs it, with --hybrid false: a function of the step's index -> its
    seconds by part."""
    torch.manual_seed(args.seed)
    policy = presets.apply_lora(presets.build_tiny(tok))
    params = [p for p in policy.parameters() if p.requires_grad]
    rft = train_rft.Args(hybrid=False, batch_size=args.batch_size, group_size=args.group_size,
                         max_new_tokens=args.max_new_tokens, beta=args.beta)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    retriever = retrieval.TextPoseRetriever(retrieval.RetrieverConfig()).eval()  # untrained, as step_timing.py's
    ctx = train_rft.StepContext(policy, tok, opt, params, rewards.TextSimilarity(""), retriever, body.BodyModel(),
                                hygrpo.make_loss(None), rollout.suppressed_tokens(policy, tok))
    B, G = args.batch_size, args.group_size
    original, lengths = rollout.rollout, []

    def counted(*a, **k):  # the answers' mean length (tokens up to and including eos), for the printout
        ro = original(*a, **k)
        lengths.append(ro.completion_mask.sum(1).float().mean().item())
        return ro

    def step(s: int) -> dict:
        t0 = time.perf_counter()
        rollout.rollout = counted
        try:
            rec = train_rft.hygrpo_step(ctx, [samples[s * B + i] for i in range(B) for _ in range(G)], B, G, rft,
                                        logged=False)
        finally:
            rollout.rollout = original
        wall = time.perf_counter() - t0
        if "skipped" in rec:
            raise RuntimeError(f"our step {s} was skipped: {rec['skipped']}")
        return {**{p: rec[f"time/{p}_s"] for p in PARTS}, "total": wall, "length": lengths[-1]}
    return step


def run_trl(tok, samples, args: Args, after_step=None) -> list[dict]:
    """TRL's GRPOTrainer on the same work: one dict of seconds by part per timed step. `after_step(s)`, if given,
    runs after TRL's step s (0-based) and outside its timing."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def format_reward(completion_ids, task, answer, **_):  # Eq. 9 on the answer as rewards.score decodes it
        texts = [data.clean_answer(t, tok) for t in tok.batch_decode(completion_ids, skip_special_tokens=False)]
        return rewards.format_reward(texts, task, answer).tolist()

    B, G = args.batch_size, args.group_size
    dataset = Dataset.from_dict({"prompt": [trl_prompt(tok, s) for s in samples],
                                 "task": [s.task for s in samples], "answer": [s.answer for s in samples]})
    torch.manual_seed(args.seed)
    base = presets.build_tiny(tok)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),  # required; nothing is written there
        per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=args.max_new_tokens, temperature=1.0, beta=args.beta, num_iterations=1,
        loss_type="grpo", epsilon=0.2, scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.warmup + args.steps, shuffle_dataset=False, gradient_checkpointing=False, bf16=False,
        use_cpu=True, use_vllm=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=args.seed, dataloader_num_workers=0)
    lora = presets.lora_config(base)  # ours, less the LM head's <POSE> row (the module docstring says why)
    lora.trainable_token_indices = {"embed_tokens": lora.trainable_token_indices["embed_tokens"]}
    trainer = GRPOTrainer(model=base, reward_funcs=format_reward, args=config, train_dataset=dataset,
                          processing_class=tok, peft_config=lora)

    t = dict.fromkeys(PARTS + ("prepare", "train_step"), 0.0)
    marks, lengths, out = {}, [], []

    def timed(name, part, when=lambda: True, seen=None):  # trainer.name, its seconds added to t[part]
        f = getattr(trainer, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            result = f(*a, **k)
            if when():
                t[part] += time.perf_counter() - t0
            marks[f"after_{name}"] = time.perf_counter()
            if seen:
                seen(result)
            return result
        setattr(trainer, name, wrapper)

    timed("_generate", "generate", seen=lambda r: lengths.append(sum(map(len, r[1])) / len(r[1])))  # answer lengths
    timed("_calculate_rewards", "rewards")
    timed("_get_per_token_logps_and_entropies", "reference", when=lambda: not torch.is_grad_enabled())
    timed("_prepare_inputs", "prepare")
    timed("training_step", "train_step")

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["step"] = time.perf_counter()

        def on_optimizer_step(self, *_, **__):
            t["optimizer"] += time.perf_counter() - marks["after_training_step"]

        def on_step_end(self, _args, state, *__, **___):
            if state.global_step > args.warmup:
                row = {p: t[p] for p in ("generate", "rewards", "reference", "optimizer")}
                out.append({**row, "policy": t["train_step"] - t["prepare"],
                            "total": time.perf_counter() - marks["step"], "length": lengths[-1]})
            t.update(dict.fromkeys(t, 0.0))
            if after_step is not None:
                after_step(state.global_step - 1)
            marks["step"] = time.perf_counter()
    trainer.add_callback(Clock())
    trainer.remove_callback(PrinterCallback)  # logging is off; this would still print the run's summary
    trainer.train()
    return out


def side_by_side(tok, samples, args: Args) -> dict:
    """Both sides, taking turns step by step: side -> one dict of seconds by part per timed step."""
    step, ours = our_step(tok, samples, args), []
    trl_rows = run_trl(tok, samples, args, after_step=lambda s: ours.append(step(s)))
    return {"trl": trl_rows, "ours": ours[args.warmup:]}


def table(rows: dict, args: Args) -> str:
    """The medians of each side (rows: side -> one dict a timed step) and the ratio ours / TRL."""
    import trl

    m = {}
    for side in ("trl", "ours"):
        for r in rows[side]:
            r["other"] = r["total"] - sum(r[p] for p in PARTS)
        m[side] = {k: statistics.median(r[k] for r in rows[side]) for k in rows[side][0]}
    names = {"trl": "TRL GRPOTrainer", "ours": "ours (train_rft --hybrid false)"}
    lines = [f"B = {args.batch_size} text-to-pose prompts x G = {args.group_size}, {args.max_new_tokens} new tokens, "
             f"beta {args.beta}, tiny preset + LoRA, cpu, {args.threads} thread(s); TRL {trl.__version__}; medians "
             f"of {len(rows['trl'])} steps a side after {args.warmup}, the sides taking turns",
             f"{'seconds':31s} " + " ".join(f"{p:>9s}" for p in PARTS + ("other", "total")) + "   answer tokens"]
    lines += [f"{names[side]:31s} " + " ".join(f"{m[side][p]:9.3f}" for p in PARTS + ("other", "total"))
              + f"   {m[side]['length']:5.1f}" for side in ("trl", "ours")]
    lines.append(f"ours / TRL = {m['ours']['total'] / m['trl']['total']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    import trl  # noqa: F401  (the optional install, before any work)

    torch.set_num_threads(args.threads)
    tok, samples = prompts(args)
    rows = side_by_side(tok, samples, args)
    if torch.get_num_threads() != args.threads:
        print(f"warning: torch ran with {torch.get_num_threads()} threads at the end, not {args.threads}")
    print(table(rows, args))


if __name__ == "__main__":
    main()

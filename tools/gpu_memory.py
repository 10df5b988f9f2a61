"""GPU memory of the llava-1.5-7b preset per GPU, computed from the model (docs/REAL_RUNS.md).

Parameter counts are exact: PoseLlava is built on the meta device (no memory, nothing downloaded)
from LLaVA-1.5-7B's configuration (llava-hf/llava-1.5-7b-hf's config.json, written out below, or
read from --llava_path), LoRA's size from the linear layers its regex targets (model.LORA_TARGET).
Activation sizes are estimates per token, from the tensors a Llama decoder layer keeps for its
backward pass (bf16):
    layer input for RMSNorm, its output (shared by q/k/v), q, k, v, q and k after RoPE, the
    attention output (o_proj's input), the second RMSNorm's input and output = 10 h values;
    gate, up, SiLU(gate), SiLU(gate) * up (down's input) = 4 i values.
With gradient checkpointing a layer keeps only its input (h values) and one layer is recomputed
at a time. Not counted: the CUDA context, allocator fragmentation and cuBLAS workspaces (budget
1-3 GiB), LoRA's rank-r intermediates (7 r values per layer and token), the frozen encoders'
transient activations (no gradient flows into them). Measured once (docs/REAL_RUNS.md:
`tests/gpu_7b.py`, random weights, one H200): 26.3 GiB for SFT against 21.8 computed, 27.1 GiB for
RFT against 26.0 computed.

Run:
    python tools/gpu_memory.py                               # Table 4's setting on 8 GPUs
    python tools/gpu_memory.py --gpus 4 --group_size 16      # any field of Args is a flag
    python tools/gpu_memory.py --gpus 2 --grad_accum 4       # the global batch in 4 micro-batches a step
    python tools/gpu_memory.py --llava_path DIR --llava_instruct_json llava_instruct_150k.json   # its longest answers
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

import torch

# run as `python tools/<name>.py` from anywhere: the repository's modules are one directory up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
import posevit

GIB = 2 ** 30


@dataclass
class Args:
    gpus: int = field(default=8, metadata={"help": "data-parallel GPUs sharing the global batch"})
    sft_batch: int = field(default=80, metadata={"help": "SFT global batch (Table 4: 80)"})
    rft_batch: int = field(default=16, metadata={"help": "RFT prompts per step, B (Table 4: 16)"})
    group_size: int = field(default=8, metadata={"help": "RFT samples per prompt, G (train_rft.py's default)"})
    max_new_tokens: int = field(default=24, metadata={"help": "RFT's longest sampled answer"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per step, N (the training scripts' --grad_accum): a GPU holds the activations of "
                "batch / (gpus x N) samples at a time"})
    text_tokens: int = field(default=48, metadata={
        "help": "bos + chat template + prompt + answer tokens of an image sample (a micro-batch is padded to its "
                "longest); --llava_instruct_json measures it"})
    llava_instruct_json: str = field(default="", metadata={
        "help": "measure --text_tokens on this LLaVA-Instruct file with --llava_path's tokenizer: its longest turn, "
                "cut at --max_length as train_sft.py cuts it (the worst micro-batch: every sample that long)"})
    max_length: int = field(default=2048, metadata={"help": "train_sft.py's --max_length (the 7B preset's 2048)"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (the scripts' default)"})
    head_rank: int = field(default=4, metadata={"help": "pose head covariance rank R"})
    llava_path: str = field(default="", metadata={"help": "read LLaVA's config.json here ('' : LLaVA-1.5-7B's, below)"})


def llava_7b_config(llava_path: str = "", head_rank: int = 4) -> model.PoseLlavaConfig:
    """The 7B preset's configuration: LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/14-336) + HMR2.0's ViT-H."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if llava_path:
        lc = LlavaConfig.from_pretrained(llava_path)
        text, vision, layer = lc.text_config, lc.vision_config, lc.vision_feature_layer
    else:  # llava-hf/llava-1.5-7b-hf's config.json
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           tie_word_embeddings=False)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        layer = -2
    return model.PoseLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000,
                                 pose_token_id=32002, pose_vision_config=posevit.VIT_H, vision_feature_layer=layer,
                                 vision_feature_select_strategy="default", pose_head_rank=head_rank,
                                 compute_dtype="bfloat16")


def count_parameters(cfg: model.PoseLlavaConfig, lora_rank: int) -> dict:
    """Exact parameter counts of each part, from the model built on the meta device."""
    with torch.device("meta"):
        m = model.PoseLlavaForConditionalGeneration(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    target = re.compile(model.LORA_TARGET)
    lora = sum(lora_rank * (mod.in_features + mod.out_features) for name, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and target.fullmatch(name))
    h = cfg.text_config.hidden_size
    return {"language model + LM head": n(m.model.language_model) + n(m.lm_head), "CLIP ViT-L/14-336 (f_a)":
            n(m.model.vision_tower), "HMR2.0 ViT-H (f_b)": n(m.model.pose_tower),
            "trained modules (W_a, W_b, pose head)": n(m.model.multi_modal_projector) + n(m.model.pose_projector)
            + n(m.pose_head), "LoRA": lora, "new token rows (embedding + LM head)": 2 * h,
            "num_image_tokens": m.num_image_tokens}


def text_lengths(json_path: str, llava_path: str, num_image_tokens: int, max_length: int) -> list:
    """The text tokens of each LLaVA-Instruct turn as train_sft.py encodes it (bos + chat template + prompt +
    answer + eos, data.collate, without the image placeholders), cut where --max_length cuts the answer."""
    import os

    from transformers import AutoTokenizer

    import data
    import realdata

    if not llava_path:
        raise SystemExit("--llava_instruct_json: pass --llava_path too (its tokenizer counts the tokens)")
    tok = AutoTokenizer.from_pretrained(llava_path)
    turns = realdata.LLaVAInstruct(json_path, os.path.dirname(os.path.abspath(json_path))).turns  # no image is read
    texts = [data.chat_text((data.IMAGE_TOKEN + "\n" if image else "") + q, a) for _, image, q, a in turns]
    image_id = tok.convert_tokens_to_ids(data.IMAGE_TOKEN)
    out = []
    for (_, image, _, _), ids in zip(turns, tok(texts, add_special_tokens=False)["input_ids"]):
        n_img = num_image_tokens if image else 0
        out.append(min(2 + len(ids) - ids.count(image_id), max_length - n_img))  # + bos, eos
    return out


def memory_rows(args: Args) -> list:
    """Rows (phase, item, arithmetic, GiB) of the per-GPU memory table, and the peaks."""
    cfg = llava_7b_config(args.llava_path, args.head_rank)
    c = count_parameters(cfg, args.lora_rank)
    t = cfg.text_config
    L, h, i, V = t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.vocab_size
    frozen = c["language model + LM head"] + c["CLIP ViT-L/14-336 (f_a)"] + c["HMR2.0 ViT-H (f_b)"]
    heads = c["trained modules (W_a, W_b, pose head)"]
    trained = heads + c["LoRA"] + c["new token rows (embedding + LM head)"]
    if args.llava_instruct_json:
        lengths = sorted(text_lengths(args.llava_instruct_json, args.llava_path, c["num_image_tokens"],
                                      args.max_length))
        print(f"{args.llava_instruct_json}: {len(lengths)} turns of {lengths[len(lengths) // 2]} text tokens (median), "
              f"{lengths[int(0.99 * (len(lengths) - 1))]} (99th percentile), {lengths[-1]} (longest): "
              f"--text_tokens {lengths[-1]}")
        args.text_tokens = lengths[-1]
    T = c["num_image_tokens"] + args.text_tokens  # tokens of an image sample
    rows = [("both", "frozen weights, bf16", f"{frozen / 1e9:.3f} B params x 2 B", frozen * 2),
            ("both", "trained modules' frozen originals (pi_ref), fp32", f"{heads / 1e6:.1f} M x 4 B", heads * 4),
            ("both", "trained params + grads + AdamW m, v, fp32",
             f"({heads / 1e6:.1f} M modules + {c['LoRA'] / 1e6:.1f} M LoRA r={args.lora_rank} + {2 * h} token) x 16 B",
             trained * 16)]
    fixed = sum(r[3] for r in rows)
    layer = (10 * h + 4 * i) * 2  # bytes per token, one layer's saved tensors (docstring)
    # SFT: the global batch split over the GPUs and the micro-batches (--grad_accum)
    b = args.sft_batch // (args.gpus * args.grad_accum)
    tok = b * T
    sft = [("SFT", "layer inputs kept by checkpointing", f"{L} x {h} x 2 B x {tok} tok ({b} x {T})", L * h * 2 * tok),
           ("SFT", "one layer recomputed in backward", f"(10 x {h} + 4 x {i}) x 2 B x {tok} tok", layer * tok),
           ("SFT", "logits bf16 + fp32 copy + log-softmax", f"{V} x (2 + 4 + 4) B x {tok} tok", V * 10 * tok)]
    # RFT: whole groups per GPU; generate keeps the KV cache and every layer's hidden states
    seqs = args.rft_batch // (args.gpus * args.grad_accum) * args.group_size
    tok_r = seqs * (T + args.max_new_tokens)
    gen = [("RFT generate", "KV cache", f"2 x {L} x {h} x 2 B x {tok_r} tok ({seqs} seq x {T + args.max_new_tokens})",
            2 * L * h * 2 * tok_r),
           ("RFT generate", "hidden states (output_hidden_states)", f"({L} + 1) x {h} x 2 B x {tok_r} tok",
            (L + 1) * h * 2 * tok_r)]
    upd = [("RFT update", "layer inputs kept by checkpointing", f"{L} x {h} x 2 B x {tok_r} tok", L * h * 2 * tok_r),
           ("RFT update", "one layer recomputed in backward", f"(10 x {h} + 4 x {i}) x 2 B x {tok_r} tok",
            layer * tok_r),
           ("RFT update", "logits bf16 (all positions) + fp32 log-softmax of the answers",
            f"{V} x (2 B x {tok_r} tok + 8 B x {seqs * args.max_new_tokens} answer tok)",
            V * (2 * tok_r + 8 * seqs * args.max_new_tokens))]
    ref = [("RFT", "the SFT adapter kept frozen for pi_ref (LoRA + trained modules), fp32",
            f"({heads / 1e6:.1f} M + {c['LoRA'] / 1e6:.1f} M) x 4 B", (heads + c["LoRA"]) * 4)]
    peak_sft = fixed + sum(r[3] for r in sft)
    peak_rft = fixed + ref[0][3] + max(sum(r[3] for r in gen), sum(r[3] for r in upd))
    return rows + sft + ref + gen + upd, {"SFT peak": peak_sft, "RFT peak (max of generate, update)": peak_rft}, c


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    for what, batch in (("--sft_batch", args.sft_batch), ("--rft_batch", args.rft_batch)):
        if args.grad_accum < 1 or batch % (args.gpus * args.grad_accum):
            raise SystemExit(f"{what} {batch} must be divisible by --gpus ({args.gpus}) x --grad_accum "
                             f"({args.grad_accum}), as the training scripts require")
    rows, peaks, counts = memory_rows(args)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in counts.items() if k != "num_image_tokens")
          + f"; visual tokens per image {counts['num_image_tokens']}")
    print(f"\nper GPU, {args.gpus} GPUs, SFT batch {args.sft_batch}, RFT B {args.rft_batch} x G {args.group_size}, "
          f"{args.grad_accum} micro-batch(es) a step, {args.text_tokens} text tokens a sample, 1 GiB = 2^30 B\n")
    print("| phase | item | arithmetic | GiB |\n|---|---|---|---|")
    for phase, item, how, nbytes in rows:
        print(f"| {phase} | {item} | {how} | {nbytes / GIB:.2f} |")
    for name, nbytes in peaks.items():
        print(f"| **{name}** | | + CUDA context / fragmentation, not counted | **{nbytes / GIB:.1f}** |")
    return rows, peaks


if __name__ == "__main__":
    main()

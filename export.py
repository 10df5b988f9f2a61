"""Export a trained run (train_sft.py's or train_rft.py's --out_dir) as one standalone model directory: the
adapters merged into the weights (an RFT run's SFT adapter and its own, summed as it trains them), the
trained modules and token rows in place, the tokenizer beside it. transformers' Auto classes load it once
model.py is imported (it registers the `pose_llava` model type); nothing of the training scripts is needed:

    import model  # registers pose_llava with AutoConfig and AutoModelForImageTextToText
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    policy = AutoModelForImageTextToText.from_pretrained("exported")
    tokenizer = AutoTokenizer.from_pretrained("exported")

The weights are merged and saved in float32 and the export runs in float32 (no bf16 autocast): merging a
LoRA update into bf16 weights would round it away in part (docs/REAL_RUNS.md). So the exported
7B policy is the trained one without bf16 rounding, which evaluate.py's bf16-autocast path has; the small
presets (float32 throughout) give evaluate.py's poses to float rounding (tests/test_export.py).

Run:
    python export.py --ckpt ckpt/rft --out exported/rft
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import checkpoint
import presets


@dataclass
class Args:
    ckpt: str = field(default="ckpt/rft", metadata={"help": "a train_sft.py or train_rft.py output directory"})
    out: str = field(default="exported", metadata={"help": "the directory to write (must not hold a model already)"})
    preset: str = field(default="", metadata={"help": "the run's preset ('' : read from the run)"})


def export(ckpt: str, out: str, preset: str | None = None) -> str:
    """Write the merged float32 model and the tokenizer of run `ckpt`'s latest checkpoint into `out`
    (atomically: a temporary directory renamed into place). Returns out."""
    step_dir = checkpoint.run_step(ckpt, "--ckpt")
    policy, tok, step_dir = presets.load_policy(ckpt, preset or None, step_dir=step_dir)
    policy.float()  # merge in float32: a bf16 weight would round the update
    merged = policy.merge_and_unload()  # the active adapters: an RFT run's SFT LoRA + its own, its modules
    merged.config.compute_dtype = None  # run in float32, as merged
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "pose_rft.json"), "w") as fh:
        json.dump({"run": os.path.abspath(ckpt), "step": os.path.basename(step_dir),
                   "load": "import model; transformers.AutoModelForImageTextToText.from_pretrained(DIR)"}, fh, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise SystemExit(f"--out {args.out} holds a model already: pass another directory (or delete it)")
    checkpoint.check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")
    print(f"exported {args.ckpt} to {export(args.ckpt, args.out, args.preset)}")


if __name__ == "__main__":
    main()

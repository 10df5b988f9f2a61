"""model.py and posevit.py, the llava-1.5-7b preset at toy width: HMR2.0's checkpoint key names mapped onto PoseViT
(against a reference forward written from 4D-Humans' ViT), the aspect-preserving pose crop, and
`build_llava_7b` from a fake --llava_path (tiny LLaMA + tiny CLIP saved by save_pretrained) and a
synthetic Lightning .ckpt, through forward/backward in bf16 autocast, LoRA and save/load."""
import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, \
    PreTrainedTokenizerFast

import data
import posevit
import presets
from model import CLIP_MEAN, IDENTITY_6D

TOY_VIT = dict(image_size=(64, 48), patch_size=16, dim=32, depth=2, heads=2, mlp_ratio=4.0, patch_padding=2)
CLIP_SIZE = 56  # the toy CLIP tower: 56 / 14 = 4 x 4 patches


def hmr2_state_dict(dim=32, depth=2, grid=(4, 3), seed=0, mlp=4):
    """A synthetic HMR2.0 Lightning state dict: the real checkpoint's key names (4D-Humans
    hmr2/models/backbones/vit.py inside hmr2/models/hmr2.py's `self.backbone`), toy sizes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = collections.OrderedDict()
    sd["backbone.pos_embed"] = r(1, 1 + grid[0] * grid[1], dim)  # the class-token slot first
    sd["backbone.patch_embed.proj.weight"] = r(dim, 3, 16, 16)
    sd["backbone.patch_embed.proj.bias"] = r(dim)
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = 1 + r(dim)
            sd[p + norm + ".bias"] = r(dim)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = r(3 * dim, dim), r(3 * dim)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(dim, dim), r(dim)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(mlp * dim, dim), r(mlp * dim)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(dim, mlp * dim), r(dim)
    sd["backbone.last_norm.weight"], sd["backbone.last_norm.bias"] = 1 + r(dim), r(dim)
    # the rest of HMR2.0: not the backbone, must be ignored
    sd["smpl_head.decpose.weight"], sd["smpl_head.init_body_pose"] = r(138, 1024), r(1, 138)
    sd["discriminator.D_conv1.weight"] = r(32, 9, 1, 1)
    return sd


def hmr2_vit_reference(sd, x, depth=2, heads=2, patch=16, pad=2):
    """4D-Humans' ViT forward, written out: padded patch conv, pos_embed[:, 1:] + pos_embed[:, :1],
    pre-norm blocks with softmax(q k^T / sqrt(d)) attention, LayerNorm eps 1e-6, last_norm."""
    x = F.conv2d(x, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"],
                 stride=patch, padding=pad)
    B, C = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    pe = sd["backbone.pos_embed"]
    x = x + pe[:, 1:] + pe[:, :1]
    N = x.shape[1]
    ln = lambda t, k: F.layer_norm(t, (C,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return ln(x, "backbone.last_norm")


class FakeCfgNode(dict):
    """Stands for yacs' CfgNode in the checkpoint's hyper-parameters: loading must never run it."""

    def __setstate__(self, state):
        raise RuntimeError("the checkpoint loader executed a class from the file")


def save_ckpt(path, sd):
    cfg = FakeCfgNode(MODEL={"BACKBONE": {"TYPE": "vit"}})
    cfg.frozen = True  # gives the object a state, so unpickling it would call __setstate__
    torch.save({"epoch": 35, "global_step": 1000000, "pytorch-lightning_version": "2.1.0", "state_dict": sd,
                "hyper_parameters": {"cfg": cfg}, "optimizer_states": [{"state": {}}]}, path)


def test_hmr2_keys_map_onto_posevit_and_match_the_reference_forward(tmp_path):
    sd = hmr2_state_dict()
    save_ckpt(tmp_path / "hmr2.ckpt", sd)
    vit = posevit.PoseViT(**TOY_VIT)
    assert vit.grid == (4, 3)  # (64 + 4 - 16) // 16 + 1, (48 + 4 - 16) // 16 + 1, as HMR2.0's 256x192 -> 16x12
    posevit.load_hmr2_backbone(vit, str(tmp_path / "hmr2.ckpt"))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.allclose(vit(x), hmr2_vit_reference(sd, x), atol=1e-5)
    # Real ViT-H sizes give HMR2.0's 16 x 12 grid.
    assert posevit.PoseViT(**{**posevit.VIT_H, "depth": 0}).grid == (16, 12)


def test_hmr2_mapping_errors_name_the_keys(tmp_path):
    vit = posevit.PoseViT(**TOY_VIT)
    sd = hmr2_state_dict()
    bad = dict(sd, **{"backbone.blocks.0.attn.rel_pos_h": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"unknown \['backbone.blocks.0.attn.rel_pos_h'\]"):
        posevit.map_hmr2_backbone(bad, vit)
    bad = {k: v for k, v in sd.items() if k != "backbone.last_norm.bias"}
    with pytest.raises(KeyError, match=r"missing \['backbone.last_norm.bias'\]"):
        posevit.map_hmr2_backbone(bad, vit)
    with pytest.raises(KeyError, match="no 'backbone.\\*' keys .*smpl_head"):
        posevit.map_hmr2_backbone({k: v for k, v in sd.items() if not k.startswith("backbone.")}, vit)
    with pytest.raises(ValueError, match=r"backbone.pos_embed has shape \(1, 12, 16\) but this PoseViT expects"):
        posevit.map_hmr2_backbone(hmr2_state_dict(dim=16), vit)  # a narrower ViT (ViT-B/L vs ViT-H, say)
    with pytest.raises(ValueError, match="pos_embed has shape"):
        posevit.map_hmr2_backbone(dict(sd, **{"backbone.pos_embed": torch.zeros(1, 12, 32)}), vit)
    with pytest.raises(FileNotFoundError, match="--hmr2_ckpt .*4D-Humans"):
        posevit.load_hmr2_backbone(vit, str(tmp_path / "absent.ckpt"))
    torch.save({"model": {"w": torch.zeros(1)}, "note": "not lightning"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected a Lightning checkpoint"):
        posevit.load_hmr2_backbone(vit, str(tmp_path / "other.pt"))


def test_pose_crop_keeps_the_aspect_ratio_as_hmr2():
    """A 336 x 336 person crop (LLaVA's input) gives the pose ViT the pixels HMR2.0 sees: the centre
    3/4 of the columns of its square crop, at 256 x 192; squashing the square would not."""
    S = 336
    v, u = torch.meshgrid((torch.arange(S) + 0.5) / S, (torch.arange(S) + 0.5) / S, indexing="ij")
    f = lambda uu, vv: torch.stack([torch.sin(7 * uu) * vv, torch.cos(5 * vv), uu * uu])  # noqa: E731  smooth
    square = f(u, v)[None]  # (1, 3, S, S), pixel (i, j) at (v, u) in [0, 1]^2
    ours = posevit.crop_to_aspect(square, (256, 192))
    vv, uu = torch.meshgrid((torch.arange(256) + 0.5) / 256, 0.125 + 0.75 * (torch.arange(192) + 0.5) / 192,
                            indexing="ij")
    hmr2 = f(uu, vv)[None]  # the centre 192 of 256 columns of the same square crop
    squashed = F.interpolate(square, (256, 192), mode="bilinear", antialias=True)
    assert (ours - hmr2).abs().max() < 0.02 and (squashed - hmr2).abs().max() > 0.2
    tall = posevit.crop_to_aspect(torch.arange(16.0).reshape(1, 1, 8, 2), (2, 2))  # a tall input keeps its centre rows
    assert torch.equal(tall, torch.tensor([[[[6.0, 7.0], [8.0, 9.0]]]]))


# ---- build_llava_7b from a fake --llava_path ----------------------------------------------------

WORDS = ("USER", "ASSISTANT", ":", ".", "?", "\n", "The", "SMPL", "pose", "of", "this", "person", "is", "What",
         "the", "in", "image", "Yes", ",", "arm", "straight", "Is", "left")


def fake_llava_dir(path, vocab_pad=0, text=None, vision=None, device="cpu", tokenizer=None):
    """A tiny LLaMA + tiny CLIP in transformers' LLaVA format, with a word-level tokenizer holding
    <image> but not <POSE> (as LLaVA's), or `tokenizer` (with LLaVA's <unk> <s> </s> <image> <pad>).
    `text` / `vision` override the configs' sizes (tests/gpu_7b.py writes LLaVA-1.5-7B's, built on
    `device` in bf16)."""
    if tokenizer is None:
        specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
        vocab = {t: i for i, t in enumerate(specials + [w for w in WORDS if w != "\n"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation("isolated")])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                            pad_token="<pad>")
    tokenizer.save_pretrained(path)
    vocab = tokenizer.get_vocab()
    text = LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=128, vocab_size=len(vocab) + vocab_pad),
                          **(text or {})}, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], tie_word_embeddings=False)
    vis = CLIPVisionConfig(**{**dict(image_size=CLIP_SIZE, patch_size=14, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=4, projection_dim=32), **(vision or {})})
    n_img = (vis.image_size // vis.patch_size) ** 2
    cfg = LlavaConfig(text_config=text.to_dict(), vision_config=vis.to_dict(), image_token_id=vocab["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=n_img)
    torch.manual_seed(0)
    with torch.device(device):
        llava = LlavaForConditionalGeneration(cfg)
    if device != "cpu":
        llava.to(torch.bfloat16)
    llava.save_pretrained(path)
    return llava


def samples():
    img = np.random.default_rng(0).integers(0, 255, (CLIP_SIZE, CLIP_SIZE, 3), dtype=np.uint8)
    pose6d = np.tile(IDENTITY_6D.numpy(), (24, 1)).astype(np.float32)
    return [data.Sample("image_to_pose", "<image>\nWhat is the SMPL pose of the person in the image?", data.POSE_ANSWER,
                        image=img, pose6d=pose6d),
            data.Sample("vqa", "<image>\nIs the left arm straight?", "Yes, the left arm is straight.", image=img)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    llava = fake_llava_dir(str(d / "llava"))
    sd = hmr2_state_dict()
    save_ckpt(d / "hmr2.ckpt", sd)
    model, tok = presets.build_llava_7b(str(d / "llava"), str(d / "hmr2.ckpt"), rank=2, pose_vit=TOY_VIT)
    return d, llava, sd, model, tok


def test_build_llava_7b_loads_every_part(built):
    d, llava, sd, model, tok = built
    pose_id = tok.convert_tokens_to_ids(data.POSE_TOKEN)
    assert pose_id == model.config.pose_token_id and pose_id < model.config.text_config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # resized: the fake vocabulary was full
    # LLaVA's weights, unchanged (bf16 of the saved fp32), and HMR2.0's backbone with pos_embed folded.
    lm, ref = model.model.language_model.state_dict(), llava.model.language_model.state_dict()
    for k in ("layers.1.self_attn.q_proj.weight", "norm.weight"):
        assert torch.equal(lm[k], ref[k].to(torch.bfloat16)), k
    vt, vref = model.model.vision_tower.state_dict(), llava.model.vision_tower.state_dict()
    assert vt.keys() == vref.keys() and all(torch.equal(vt[k], vref[k].bfloat16()) for k in vt)
    pe = sd["backbone.pos_embed"]
    assert torch.equal(model.model.pose_tower.pos_embed, (pe[:, 1:] + pe[:, :1]).bfloat16())
    assert torch.equal(model.model.pose_tower.blocks[1].mlp.fc2.weight,
                       sd["backbone.blocks.1.mlp.fc2.weight"].bfloat16())
    # bf16 frozen parts, float32 trained parts, autocast on, both encoders' normalisations set.
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    for m in (model.pose_head, model.model.pose_projector, model.model.multi_modal_projector):
        assert all(p.dtype == torch.float32 for p in m.parameters())
    cfg = model.config
    assert cfg.compute_dtype == "bfloat16" and cfg.pose_pixel_mean == list(posevit.IMAGENET_MEAN)
    assert cfg.vision_pixel_mean == list(CLIP_MEAN)
    assert model.num_image_tokens == 16 + 12  # CLIP 4 x 4 patches (no CLS: 'default') + PoseViT 4 x 3


def test_llava_7b_save_load_forward_backward_lora_generate(built, tmp_path):
    d, _, _, model, tok = built
    b = data.collate(samples(), tok, model.num_image_tokens)
    model.eval()
    with torch.no_grad():
        _, ref, _ = model.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    # save/load keeps the preset's dtypes and outputs
    presets.save_base(model, tok, str(tmp_path / "base"), "llava-1.5-7b")
    loaded, tok2, preset = presets.load_base(str(tmp_path / "base"), "llava-1.5-7b")
    assert preset == "llava-1.5-7b" and tok2.convert_tokens_to_ids(data.POSE_TOKEN) == model.config.pose_token_id
    assert loaded.pose_head.mlp[0].weight.dtype == torch.float32
    assert loaded.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    loaded.eval()
    with torch.no_grad():
        _, again, _ = loaded.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert torch.equal(again.mean, ref.mean)
    # LoRA: float32 master weights, gradients through the bf16 autocast and gradient checkpointing
    policy = presets.apply_lora(loaded, rank=4)
    presets.enable_gradient_checkpointing(policy.get_base_model())
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert logits.dtype == torch.bfloat16 and dist.mean.dtype == torch.float32
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                           ignore_index=-100) - dist.log_prob(b.pose6d.reshape(2, -1))[b.pose_valid].mean()
    loss.backward()
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    for key in ("pose_head", "pose_projector", "multi_modal_projector", "lora_B", "trainable_tokens"):
        grads = [p.grad for n, p in named.items() if key in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), key
        assert any(g.abs().sum() > 0 for g in grads), key
    # pi_ref = the loaded model exactly, under disable_adapter()
    policy.eval()
    with torch.no_grad(), policy.disable_adapter():
        _, ref2, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert torch.equal(ref2.mean, ref.mean)
    # generate runs under the same autocast
    p = data.collate(samples()[:1], tok, model.num_image_tokens, add_answer=False, pad_side="left")
    out = policy.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values,
                          max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == p.input_ids.shape[1] + 3


def test_build_llava_7b_names_missing_assets(tmp_path):
    with pytest.raises(FileNotFoundError, match="--llava_path .*llava-hf/llava-1.5-7b-hf"):
        presets.build_llava_7b(str(tmp_path / "none"), str(tmp_path / "x.ckpt"))
    os.makedirs(tmp_path / "l")
    (tmp_path / "l" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--hmr2_ckpt .*4D-Humans"):
        presets.build_llava_7b(str(tmp_path / "l"), str(tmp_path / "x.ckpt"))

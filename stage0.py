"""Stage 0: the small presets' stand-ins for the paper's pretrained parts, trained once per benchmark,
configuration and seed, and cached (the paper starts from CLIP, HMR2.0's ViT and Vicuna instead).

  a) the pose-aware ViT f_b (a convolutional stem, then 16 tokens) is pretrained on pose estimation:
     regress the 24 view-frame joints from the benchmark renders ("a Vision Transformer pretrained on
     pose estimation", App. A), and the view-frame 6D pose the head will output, through a readout of
     the MEAN token (`--stage0_readout mean`): the pose must fit one D-vector, as it must at `<POSE>`,
     so an attention layer that averages the tokens hands it to the language model whole;
  b) the CLIP tower f_a is pretrained contrastively on render/caption pairs (CLIP's objective, with a
     bag-of-words text encoder);
  c) the tiny preset's language model is pretrained on the training split's text (causal LM), standing
     in for a pretrained LLM, so that LoRA adapts a model that already speaks the language.

Then both encoders are frozen, as in the paper (§4.1). `pretrain` runs it once per cache key
(`cache_key`: the benchmark, the preset's configuration, the stage-0 flags, the seed and VERSION) and
caches the result like the benchmark: the report's two SFT runs of a seed share it. The flags are
train_sft.py's `--stage0_*`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

import body
import data
import plumbing
import posebench
import presets
import vocab
from metrics import gross_state_correct, mpjpe_mm, pa_mpjpe_mm, root_error_deg
from model import POSE_DIM
from render import view_rotation


VERSION = 3  # bump when stage 0's recipe changes: part of its cache key


class Mean1(torch.nn.Module):
    def forward(self, x):  # (B, L, D) -> (B, D)
        return x.mean(1)


def pose_vit(model, train, evals: dict, args, device, log):
    """Pretrain f_b on pose estimation: PoseViT tokens, flattened (where a limb is matters) -> linear
    -> 24 x 3 view-frame joints, L1 loss, AdamW with a cosine schedule (`--stage0_pose_lr`).
    Returns the encoder's MPJPE / PA-MPJPE (mm) on each split of `evals` ({name: PoseBenchSplit}),
    beside always answering the mean training pose, and the per-step losses."""
    vit = model.model.pose_tower
    n_out = body.NUM_JOINTS * 3 + (POSE_DIM if args.stage0_rot6d_weight else 0)
    if args.stage0_readout == "flatten":
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(vit.dim * vit.grid[0] * vit.grid[1],
                                                                       n_out)).to(device)
    else:  # the mean token -> MLP: the pose must fit one D-vector, as it must at <POSE>
        head = torch.nn.Sequential(Mean1(), torch.nn.Linear(vit.dim, 4 * vit.dim), torch.nn.GELU(),
                                   torch.nn.Linear(4 * vit.dim, n_out)).to(device)
    rot6d = torch.as_tensor(data.view_pose6d(train), dtype=torch.float32).reshape(len(train), -1)  # (N, P)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_pose_lr, betas=(0.9, 0.95))
    steps = max(1, int(args.stage0_pose_epochs * len(train) / args.stage0_batch))
    g = torch.Generator().manual_seed(args.seed)
    target = torch.as_tensor(train.joints_view)
    encode = lambda images: head(model.model.pose_features(data.images_to_pixels(images, device)))  # noqa: E731
    losses = []
    from tqdm import tqdm
    for step in tqdm(range(steps), desc="stage 0a: pose ViT", disable=None):
        idx = torch.randint(len(train), (args.stage0_batch,), generator=g)
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, steps, args.stage0_pose_lr, min(50, steps // 10))
        out = encode(train.images[idx.numpy()])
        n_j = body.NUM_JOINTS * 3
        loss = F.l1_loss(out[:, :n_j], target[idx].reshape(len(idx), -1).to(device))
        if args.stage0_rot6d_weight:  # the view-frame 6D pose too: what the pose head will output
            loss = loss + args.stage0_rot6d_weight * F.l1_loss(out[:, n_j:], rot6d[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    res = {}
    with torch.no_grad():
        for name, split in evals.items():
            out = torch.cat([encode(split.images[i:i + 256]).cpu() for i in range(0, len(split), 256)])
            pred = out[:, :body.NUM_JOINTS * 3].reshape(-1, body.NUM_JOINTS, 3)
            if args.stage0_rot6d_weight:  # the readout's root orientation, as evaluate.py measures <POSE>'s
                gt_root = torch.as_tensor(data.view_pose6d(split))[:, 0].float()
                res[f"stage0/{name}/pose_vit_root_error_deg"] = root_error_deg(
                    body.rot6d_to_matrix(out[:, body.NUM_JOINTS * 3:body.NUM_JOINTS * 3 + 6]),
                    body.rot6d_to_matrix(gt_root)).median().item()
            gt = torch.as_tensor(split.joints_view)
            mean_pose = target.mean(0, keepdim=True).expand_as(gt)
            cam = torch.as_tensor(split.camera)
            world = pred.double() @ view_rotation(cam[:, 0], cam[:, 1]).double()  # the camera undone (row vectors)
            res.update({f"stage0/{name}/pose_vit_mpjpe_mm": mpjpe_mm(pred, gt).mean().item(),
                        f"stage0/{name}/pose_vit_gross_state_correct": gross_state_correct(world, split.joints),
                        f"stage0/{name}/pose_vit_pa_mpjpe_mm": pa_mpjpe_mm(pred, gt).mean().item(),
                        f"stage0/{name}/mean_pose_mpjpe_mm": mpjpe_mm(mean_pose, gt).mean().item(),
                        f"stage0/{name}/mean_pose_pa_mpjpe_mm": pa_mpjpe_mm(mean_pose, gt).mean().item()})
    log(res)
    return res, losses


def clip(model, train, tokenizer, args, device, log):
    """Pretrain f_a with CLIP's symmetric contrastive loss on render/caption pairs; the text
    side is a bag of word embeddings (thrown away afterwards)."""
    clip = model.model.vision_tower
    D = clip.config.hidden_size
    words = torch.nn.Embedding(len(tokenizer), D).to(device)
    img_proj = torch.nn.Linear(D, D).to(device)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = list(clip.parameters()) + list(words.parameters()) + list(img_proj.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, betas=(0.9, 0.95))
    steps = int(args.stage0_clip_epochs * len(train) / args.stage0_batch)
    g = torch.Generator().manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm
    for step in tqdm(range(steps), desc="stage 0b: CLIP tower", disable=None):
        idx = torch.randint(len(train), (args.stage0_batch,), generator=g).numpy()
        texts = [train.captions[i][rng.integers(len(train.captions[i]))] for i in idx]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        t = F.normalize((words(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)  # mean of words
        v = F.normalize(img_proj(clip(data.images_to_pixels(train.images[idx], device)).pooler_output), dim=-1)
        logits = scale.exp().clamp(max=100) * v @ t.T  # (B, B)
        labels = torch.arange(len(idx), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if steps:  # (0 epochs: the tower stays as initialised)
        top1 = (logits.argmax(1) == labels).float().mean().item()
        log({"stage0/clip_loss": loss.item(), "stage0/clip_batch_top1": top1})


def lm_texts(cfg: posebench.BenchConfig) -> list:
    """The LM pretraining texts: the training split's prompts and answers without image placeholders."""
    return [t for t in vocab.benchmark_texts(cfg, splits=("train",)) if data.IMAGE_TOKEN not in t]


def lm(model, tokenizer, cfg, args, device, log):
    """Pretrain the tiny LM (and LM head) on the benchmark's training texts: prompts and answers in
    the chat format, image placeholders dropped (no val or test caption). Stands in for a pretrained
    LLM."""
    texts = lm_texts(cfg)
    lm = model.model.language_model
    params = list(lm.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm
    for step in tqdm(range(args.stage0_lm_steps), desc="stage 0c: LM", disable=None):
        batch = [texts[i] for i in rng.integers(len(texts), size=args.stage0_lm_batch)]
        enc = tokenizer([tokenizer.bos_token + " " + t + " " + tokenizer.eos_token for t in batch],
                        padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model.lm_head(lm(input_ids=ids, attention_mask=mask).last_hidden_state)
        labels = ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        for pg in opt.param_groups:
            pg["lr"] = plumbing.cosine_lr(step, args.stage0_lm_steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if args.stage0_lm_steps:
        log({"stage0/lm_loss": loss.item()})


def parts(model, preset: str) -> dict:
    """The modules stage 0 trains: both encoders, and the tiny preset's LM and LM head."""
    parts = {"pose_tower": model.model.pose_tower, "vision_tower": model.model.vision_tower}
    if preset == "tiny":
        parts.update(language_model=model.model.language_model, lm_head=model.lm_head)
    return parts


def cache_key(args, cfg: posebench.BenchConfig, model) -> tuple:
    """(key, what): stage 0's cache key, a hash of everything its result depends on: the benchmark,
    the preset and its parts' configurations, the stage-0 flags, the seed and VERSION."""
    import hashlib

    c = model.config
    what = {"version": VERSION, "preset": args.preset, "bench": posebench.config_key(cfg), "seed": args.seed,
            "pose_vision_config": c.pose_vision_config, "vision_config": c.vision_config.to_dict(),
            "text_config": c.text_config.to_dict() if args.preset == "tiny" else c.text_config._name_or_path,
            **{k: getattr(args, k) for k in sorted(vars(args)) if k.startswith("stage0_") and k != "stage0_only"}}
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], json.loads(blob)


def pretrain(base, build, tokenizer, cfg, args, device, log) -> dict:
    """Stage 0, run once per cache key (`cache_key`) and cached in <cache_dir>/stage0/<key>/, as the
    benchmark is: both SFT runs of a seed share one pretrained encoder, and a rerun finds it.

    On a miss, the parts are trained on a model made by `build()` under `torch.manual_seed(seed)`
    (so the result depends on the key alone, not on the run's pose head) and saved atomically; then
    they are loaded into `base`. Returns the encoder's metrics (`pose_vit`)."""
    from safetensors.torch import load_file, save_file

    key, what = cache_key(args, cfg, base)
    folder = os.path.join(plumbing.cache_dir(), "stage0", key)
    weights, meta = os.path.join(folder, "stage0.safetensors"), os.path.join(folder, "stage0.json")
    if not (os.path.exists(weights) and os.path.exists(meta)):
        t0 = time.time()
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = build().to(device).train()
        evals = {s: posebench.load_split(s, cfg) for s in ("val", "test")}
        train = posebench.load_split("train", cfg)
        seconds = {"setup": time.time() - t0}  # the model and the splits
        t = time.time()
        res, _ = pose_vit(model, train, evals, args, device, log)
        seconds["pose_vit"], t = time.time() - t, time.time()
        clip(model, train, tokenizer, args, device, log)
        seconds["clip"], t = time.time() - t, time.time()
        if args.preset == "tiny":
            lm(model, tokenizer, cfg, args, device, log)
            seconds["lm"] = time.time() - t
        sd = {f"{name}.{k}": v.detach().cpu().contiguous()
              for name, m in parts(model, args.preset).items() for k, v in m.state_dict().items()}
        tmp = f"{folder}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(sd, os.path.join(tmp, "stage0.safetensors"))
        with open(os.path.join(tmp, "stage0.json"), "w") as fh:
            json.dump({"key": what, "metrics": res, "seconds": round(time.time() - t0, 1),
                       "seconds_by_part": {k: round(v, 1) for k, v in seconds.items()}}, fh, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        del model
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        print(f"stage 0: trained in {time.time() - t0:.0f} s ({timing}), cached in {folder}")
    else:
        print(f"stage 0: found in the cache ({folder})")
    try:
        sd = load_file(weights)
        with open(meta) as fh:
            res = json.load(fh)["metrics"]
    except Exception as e:
        raise SystemExit(f"stage 0's cache {folder} is unreadable ({type(e).__name__}: {e}); delete that folder and "
                         "rerun to retrain stage 0") from e
    for name, m in parts(base, args.preset).items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
    log(res)
    return res


def pretrain_for_pose_input(base, args, cfg, device, log) -> dict:
    """Stage 0 of a tiny-preset run with the pose-input tasks: the default run's own (built, keyed and
    cached from the default vocabulary's model, so the two runs share one cache entry and the
    pose-input tasks add no stage-0 training), copied into `base`; the language model's input and
    output embeddings are copied into the first rows of the extended vocabulary (vocab.extend_tokenizer
    keeps every default id), whose new rows (the input-pose placeholder, the instructions' words) keep
    their initialisation. Returns the encoder's metrics, as `stage0`."""
    tok0 = vocab.tiny_tokenizer(cfg)
    default = presets.build_tiny(tok0, rank=args.head_rank, deterministic=args.deterministic_head)
    res = pretrain(default, lambda: presets.build_tiny(tok0, rank=args.head_rank), tok0, cfg, args, device, log)
    src, dst = parts(default, args.preset), parts(base, args.preset)
    with torch.no_grad():
        for name, module in src.items():
            target = dict(dst[name].named_parameters())
            for k, v in module.named_parameters():
                t = target[k]
                if t.shape != v.shape and (t.shape[1:] != v.shape[1:] or t.shape[0] < v.shape[0]):
                    raise RuntimeError(f"stage 0 of the default vocabulary does not fit {name}.{k}: {tuple(v.shape)} "
                                       f"into {tuple(t.shape)}")
                t[:len(v)] = v
    return res

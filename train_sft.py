"""Supervised fine-tuning of PoseLlava: the starting point of Pose-RFT (App. D, Table 4).

Stage 0 (built-in presets only; the paper starts from pretrained parts instead):
  a) the pose-aware ViT f_b is pretrained on pose estimation: regress the 24 view-frame joints
     from the benchmark renders ("a Vision Transformer pretrained on pose estimation", App. A);
  b) the CLIP tower f_a is pretrained contrastively on render/caption pairs (CLIP's objective,
     with a bag-of-words text encoder);
  c) the tiny preset's language model is pretrained on the benchmark's text (causal LM), standing
     in for a pretrained LLM, so that LoRA adapts a model that already speaks the language.
  Then both encoders are frozen, as in the paper (§4.1).
Stage 1, SFT on the benchmark mixture (image-to-pose, text-to-pose, VQA): cross-entropy on the
answer tokens + a pose loss at `<POSE>`: the Gaussian negative log-likelihood of the target
action p (distributional head) or an L2 on p (deterministic head, Table 3's baseline); an L2 on
6D and an L2 on joints are flags (ChatPose/PoseLLaVA-style regression), off by default: the
paper's point is that SFT optimises a parameter-space target (DESIGN.md). LoRA on the LM,
projectors and pose head trained fully; AdamW betas (0.9, 0.95), cosine schedule (Table 4).

Departures: stage 0 exists only because nothing pretrained can be downloaded here; Table 4's
batch 80 / lr 3e-4 / 10k steps are the defaults of the 7B preset, the tiny preset uses sizes a
2-core CPU finishes in minutes.

Run:
    python train_sft.py                                   # tiny preset, CPU, a few minutes
    torchrun --nproc_per_node=8 train_sft.py --preset smol  # DDP: one code path, RANK switches it on
    python train_sft.py --resume                          # continue exactly from the last checkpoint
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import body
import data
import model as M
import posebench
from evaluate import evaluate_policy, mpjpe_mm, setup_distributed


@dataclass
class Args:
    preset: str = field(default="tiny", metadata={"help": "tiny (CPU, random init + stage 0) or smol (SmolLM2-135M)"})
    out_dir: str = field(default="ckpt/sft", metadata={"help": "checkpoints, metrics.jsonl and the final model"})
    seed: int = field(default=0, metadata={"help": "seed; rank r uses seed + r for sampling"})
    resume: bool = field(default=False, metadata={"help": "continue exactly from out_dir's latest checkpoint"})
    # benchmark
    n_train: int = field(default=20000, metadata={"help": "posebench training poses"})
    n_val: int = field(default=1000, metadata={"help": "posebench validation poses"})
    n_test: int = field(default=1000, metadata={"help": "posebench test poses"})
    # stage 0
    stage0_pose_epochs: float = field(default=3.0, metadata={"help": "pose-ViT pretraining epochs (joint regression)"})
    stage0_clip_epochs: float = field(default=1.0, metadata={"help": "CLIP-tower contrastive pretraining epochs"})
    stage0_lm_steps: int = field(default=300, metadata={"help": "tiny LM pretraining steps on benchmark text"})
    stage0_lm_batch: int = field(default=64, metadata={"help": "tiny LM pretraining batch (texts)"})
    stage0_lr: float = field(default=1e-3, metadata={"help": "stage-0 learning rate"})
    stage0_batch: int = field(default=128, metadata={"help": "stage-0 batch size"})
    # stage 1 (SFT)
    steps: int = field(default=1200, metadata={"help": "SFT steps (paper, 7B: 10000)"})
    batch_size: int = field(default=32, metadata={"help": "global batch (paper: 80)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (paper, 7B: 3e-4)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank on the LM"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    head_rank: int = field(default=4, metadata={"help": "rank R of the pose covariance's low-rank factor (0: diagonal)"})
    deterministic_head: bool = field(default=False, metadata={"help": "Table 3 baseline: mean-only head, L2 pose loss"})
    pose_nll_weight: float = field(default=1.0, metadata={"help": "weight of the Gaussian NLL (per pose dim) at <POSE>"})
    l2_6d_weight: float = field(default=0.0, metadata={"help": "weight of an L2 on the 6D mean (off: paper's SFT is the NLL)"})
    l2_joints_weight: float = field(default=0.0, metadata={"help": "weight of an L2 on joints from the mean (off by default)"})
    mix: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2],
                             metadata={"help": "task mixture weights: image_to_pose, text_to_pose, vqa"})
    log_every: int = field(default=50, metadata={"help": "log metrics every n steps"})
    save_every: int = field(default=400, metadata={"help": "checkpoint every n steps"})
    eval_samples: int = field(default=1000, metadata={"help": "test poses used by the final evaluation"})
    eval_generate: int = field(default=200, metadata={"help": "test prompts per task answered by greedy generation"})
    stop_after: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this many steps; 0: run all"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads per process"})


# ---- distributed boilerplate (nanoGPT style: one code path) ---------------------------------

def all_reduce_sum(t: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_gradients(params, ddp: bool, average: bool = False):
    """Sum (or average) gradients over ranks. SFT sums: its losses are normalised by global counts,
    so the sum is the gradient of the global-batch loss, exactly as in one process. RFT averages:
    each rank's loss is a mean over its own whole groups."""
    if not ddp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, ddp)
    if average:
        import torch.distributed as dist
        flat /= dist.get_world_size()
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(g).clone()
        i += n


def trainable_params(policy, state=None):
    """(names, params) of the trainable parameters, in the order of `state`'s optimizer when
    resuming: a reloaded peft model may list its parameters in another order, and the optimizer
    state is matched by position (two same-shaped token rows would silently swap moments)."""
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    names = list(named) if state is None else state["param_names"]
    if set(names) != set(named):
        raise SystemExit(f"the checkpoint's trainable parameters differ from the model's: "
                         f"{sorted(set(names) ^ set(named))[:5]}")
    return names, [named[n] for n in names]


def make_logger(out_dir: str, master: bool):
    """log(metrics, step): one JSON object per call, printed and appended to out_dir/metrics.jsonl
    (rank 0 only)."""
    t_start = time.time()

    def log(d, step=None):
        if master:
            rec = {"step": step, "time_s": round(time.time() - t_start, 1), **d}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    return log


def restore_train_state(opt, state) -> int:
    """Load the optimizer and the RNG states of a checkpoint (save_checkpoint); return its step."""
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---- stage 0 --------------------------------------------------------------------------------

def stage0_pose_vit(model, train, val, args, device, log):
    """Pretrain f_b on pose estimation: PoseViT tokens, flattened (where a limb is matters) -> linear
    -> 24 x 3 view-frame joints."""
    vit = model.model.pose_tower
    head = torch.nn.Linear(vit.dim * vit.grid[0] * vit.grid[1], body.NUM_JOINTS * 3).to(device)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, betas=(0.9, 0.95))
    steps = int(args.stage0_pose_epochs * len(train) / args.stage0_batch)
    g = torch.Generator().manual_seed(args.seed)
    target = torch.as_tensor(train.joints_view)
    from tqdm import tqdm
    for step in tqdm(range(steps), desc="stage 0a: pose ViT", disable=None):
        idx = torch.randint(len(train), (args.stage0_batch,), generator=g)
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, steps, args.stage0_lr, 50)
        pred = head(vit(data.images_to_pixels(train.images[idx.numpy()], device)).flatten(1))
        loss = F.l1_loss(pred, target[idx].reshape(len(idx), -1).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.cat([head(vit(data.images_to_pixels(val.images[i:i + 256], device)).flatten(1)).cpu()
                          for i in range(0, len(val), 256)]).reshape(-1, body.NUM_JOINTS, 3)
    gt = torch.as_tensor(val.joints_view)
    mean_pose = target.mean(0, keepdim=True).expand_as(gt)
    res = {"stage0/pose_vit_mpjpe_mm": mpjpe_mm(pred, gt).mean().item(),
           "stage0/mean_pose_mpjpe_mm": mpjpe_mm(mean_pose, gt).mean().item()}
    log(res)
    return res


def stage0_clip(model, train, tokenizer, args, device, log):
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
            pg["lr"] = cosine_lr(step, steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = (logits.argmax(1) == labels).float().mean().item()
    log({"stage0/clip_loss": loss.item(), "stage0/clip_batch_top1": acc})


def stage0_lm(model, tokenizer, cfg, args, device, log):
    """Pretrain the tiny LM (and LM head) on the benchmark's text: prompts and answers in the chat
    format, image placeholders dropped. Stands in for a pretrained LLM."""
    texts = [t for t in data.benchmark_texts(cfg) if data.IMAGE_TOKEN not in t]
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
            pg["lr"] = cosine_lr(step, args.stage0_lm_steps, args.stage0_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log({"stage0/lm_loss": loss.item()})


# ---- stage 1: the SFT objective -------------------------------------------------------------

def sft_loss(logits, labels, pose_dist, batch: data.Batch, args, n_tokens: float, n_poses: float, bodymodel=None):
    """Cross-entropy on answer tokens + the pose loss at `<POSE>`, as sums divided by the
    GLOBAL counts n_tokens and n_poses (so that gradients summed over ranks equal one process's).

    Args:
        logits (B, T, V), labels (B, T) with -100 outside answers; pose_dist over (B, P).
    Returns:
        loss (scalar), stats (dict of floats).
    """
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="sum") / n_tokens
    valid = batch.pose_valid
    target = batch.pose6d.reshape(len(valid), -1)  # (B, P)
    mean = pose_dist.mean
    zero = logits.new_zeros(())
    if args.deterministic_head:  # Table 3 baseline: regress the parameters
        pose = ((mean - target) ** 2).mean(-1)[valid].sum() / n_poses
    else:  # Gaussian negative log-likelihood of the target action, per dimension
        pose = args.pose_nll_weight * (-pose_dist.log_prob(target) / target.shape[-1])[valid].sum() / n_poses
    l2_6d = ((mean - target) ** 2).mean(-1)[valid].sum() / n_poses if args.l2_6d_weight else zero
    l2_joints = zero
    if args.l2_joints_weight and valid.any():
        joints = bodymodel.forward_rot6d(mean[valid]).joints
        joints = joints - joints[:, :1]
        l2_joints = ((joints - batch.joints[valid]) ** 2).sum(-1).mean(-1).sum() / n_poses
    loss = ce + pose + args.l2_6d_weight * l2_6d + args.l2_joints_weight * l2_joints
    stats = {"losses/ce": ce, "losses/pose": pose, "losses/l2_6d": l2_6d, "losses/l2_joints": l2_joints}
    return loss, {k: float(v.detach()) for k, v in stats.items()}


# ---- checkpoints ----------------------------------------------------------------------------

def save_checkpoint(out_dir, step, policy, opt, args, param_names, extra=None):
    """Adapter (LoRA, projectors, pose head, new token rows) + optimizer + RNG states + step, in a
    temporary directory renamed into place; LATEST is rewritten atomically afterwards."""
    final = os.path.join(out_dir, f"step-{step:06d}")
    tmp = os.path.join(out_dir, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save({"step": step, "optimizer": opt.state_dict(), "param_names": param_names, "args": dataclasses.asdict(args),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                **(extra or {})}, os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out_dir, ".LATEST.tmp"), "w") as fh:
        fh.write(os.path.basename(final))
    os.replace(os.path.join(out_dir, ".LATEST.tmp"), os.path.join(out_dir, "LATEST"))
    return final


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.preset not in ("tiny", "smol"):
        raise SystemExit(f"--preset {args.preset}: train_sft.py knows 'tiny' and 'smol' (llava-1.5-7b arrives with real data)")
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if args.batch_size % world:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()

    def barrier():
        if ddp:
            import torch.distributed as dist
            dist.barrier()

    log = make_logger(args.out_dir, master)

    # ---- BOILERPLATE: data, stage 0 (once, on rank 0), the base model on every rank
    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    if master:
        posebench.build(cfg)
    barrier()
    train, val = posebench.load_split("train", cfg), posebench.load_split("val", cfg)
    base_dir = os.path.join(args.out_dir, "base")
    if args.resume and not os.path.exists(os.path.join(args.out_dir, "LATEST")):
        raise SystemExit(f"--resume: {args.out_dir} has no checkpoint to resume from (no LATEST file)")
    if not os.path.exists(os.path.join(base_dir, "preset.json")):
        if master:
            if args.preset == "tiny":
                tokenizer = data.tiny_tokenizer(cfg)
                base = M.build_tiny(tokenizer, rank=args.head_rank, deterministic=args.deterministic_head).to(device)
            else:
                base, tokenizer = M.build_smol(rank=args.head_rank, deterministic=args.deterministic_head)
                base = base.to(device)
            base.train()
            stage0_pose_vit(base, train, val, args, device, log)
            stage0_clip(base, train, tokenizer, args, device, log)
            if args.preset == "tiny":
                stage0_lm(base, tokenizer, cfg, args, device, log)
            M.save_base(base.cpu(), tokenizer, base_dir, args.preset)
        barrier()
    if args.resume:
        policy, tokenizer, step_dir = M.load_policy(args.out_dir, args.preset, trainable=True)
        state = torch.load(os.path.join(step_dir, "train_state.pt"), weights_only=False)
    else:
        base, tokenizer, _ = M.load_base(base_dir, args.preset)
        torch.manual_seed(args.seed)  # the adapter's init must not depend on whether stage 0 ran in this process
        policy, state = M.apply_lora(base, args.lora_rank, args.lora_alpha), None
    policy.to(device).train()
    inner = policy.get_base_model()
    bodymodel = body.BodyModel().to(device)
    names, params = trainable_params(policy, state)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start = 0
    if state is not None:
        start = restore_train_state(opt, state)
        log({"resumed_from": step_dir}, start)
    tasks = data.PoseBenchTasks("train", cfg, mix=args.mix, seed=args.seed)
    n_img = inner.num_image_tokens
    if master:
        n_train = sum(p.numel() for p in params)
        print(f"SFT: preset {args.preset}, {n_train / 1e6:.2f}M trainable of "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M, {world} process(es), device {device}")

    # ---- ALGO: SFT steps
    from tqdm import tqdm
    t_loop = time.time()
    for step in tqdm(range(start, args.steps), desc="SFT", disable=None if master else True,
                     initial=start, total=args.steps):
        # The global batch of this step depends on the step alone: resuming replays it exactly.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(tasks), (args.batch_size,), generator=g)[rank::world].tolist()
        b = data.collate([tasks[i] for i in idx], tokenizer, n_img).to(device)
        counts = torch.tensor([(b.labels[:, 1:] != -100).sum().item(), b.pose_valid.sum().item()],
                              dtype=torch.float64, device=device)
        n_tokens, n_poses = all_reduce_sum(counts, ddp).clamp_min(1).tolist()
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup_steps)
        logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        loss, stats = sft_loss(logits, b.labels, dist, b, args, n_tokens, n_poses, bodymodel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(params, ddp)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            if not args.deterministic_head:
                stats["charts/pose_std_mean"] = dist.stddev.mean().item()
            log({**stats, "losses/total": loss.item(), "charts/grad_norm": gnorm.item(),
                 "charts/lr": opt.param_groups[0]["lr"],
                 "charts/steps_per_s": (done - start) / (time.time() - t_loop)}, done)
        stop = args.stop_after and done >= args.stop_after
        if master and (done % args.save_every == 0 or done == args.steps or stop):
            save_checkpoint(args.out_dir, done, policy, opt, args, names)
        barrier()
        if stop:
            break

    # ---- BOILERPLATE: final evaluation on the test split (evaluate.py's code path; sharded over the ranks)
    if args.eval_samples > 0 and not (args.stop_after and args.stop_after < args.steps):
        test_tasks = data.PoseBenchTasks("test", cfg, seed=args.seed)
        res = evaluate_policy(policy, tokenizer, test_tasks, train, bodymodel, device, args.eval_samples,
                              n_generate=args.eval_generate)
        log({f"test/{k}": v for k, v in res.items()}, args.steps)
        if master:
            with open(os.path.join(args.out_dir, "test_metrics.json"), "w") as fh:
                json.dump(res, fh, indent=1)
            pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            print(f"\nSFT done in {time.time() - t_start:.0f} s. Test split ({args.eval_samples} poses):")
            for task in ("image_to_pose", "text_to_pose"):
                print(f"  {task:14s} MPJPE {res[task + '/mpjpe_mm']:6.1f} mm  PA-MPJPE {res[task + '/pa_mpjpe_mm']:6.1f} mm"
                      f"   | mean training pose: MPJPE {res[task + '/mean_pose_mpjpe_mm']:6.1f}  PA-MPJPE "
                      f"{res[task + '/mean_pose_pa_mpjpe_mm']:6.1f}   | answer format valid {pct(res[task + '/format_valid'])}")
            print(f"  vqa            yes/no accuracy {pct(res['vqa/yes_no_accuracy'])}")
    if ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

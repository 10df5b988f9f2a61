"""Why does RFT not improve image-to-pose here? A head-only probe with exact gradients.

HyGRPO follows a noisy estimate of the gradient of the expected joint reward (Eq. 7). This
script removes the noise: it caches the teacher-forced `<POSE>` states of an SFT checkpoint
(posebench image-to-pose, train and val), then fine-tunes a copy of the pose head's mean network
on each candidate objective by its exact gradient (the body model is differentiable), at RFT's
learning rate, and reports val MPJPE / PA-MPJPE of the head's mean. If the objective that RFT
estimates, followed exactly, raises PA-MPJPE, then more samples or a better-tuned estimator only
bring RFT closer to that path: the objective itself disagrees with the metric.

Objectives (all on pelvis-centred joints; losses in metres, rewards in 1/metres):
    6d        the SFT objective's mean part: squared error of the 6D pose (the reference line)
    eq7       the mean per-joint distance of the head's mean, unaligned (what Eq. 7 rewards)
    reward    -E[R_joint] over samples of the tempered head (Eq. 7 as RFT optimises it:
              rewards.joint_reward at --pose_temperature, by reparameterisation; mean and
              covariance networks both trained, as in RFT)
    pa        the same distance after a similarity (Procrustes) alignment: body shape only
    eq7+pa    the sum of the two distances
    eq7_true_root  eq7 with the ground-truth root substituted: what the body alone is asked for

It also prints the SFT head's root (global orientation) error on val, the quantity that makes
Eq. 7 and PA-MPJPE disagree (docs/FINDINGS.md, finding 5), and where the root is lost: the root
error of a linear (ridge) probe fitted on the same training prompts to the `<POSE>` states, and to
the pose-aware encoder's tokens f_b(x) of the same images (before W_b and the language model).
And how noisy RFT's pose gradient is (finding 6): at the first --score_states val states, the
share of the score's expected squared norm (the Fisher trace tr Sigma^-1) in the 72 directions of
the 6D no rotation depends on, and the cosine between the group policy-gradient estimate of the
mean's gradient (G samples, Eq. 16 advantages, the joint reward) and that gradient itself
(reparameterised, 512 samples), with the score of the 144-d Gaussian (`--pose_space params`, the
paper's) and of its marginal on the rotations (`--pose_space rotations`).

Run (tiny preset: 9.5 min for every objective with one thread on a 2-core CPU, measured before the
score diagnostics were added; they take about 45 s more with two threads):
    python tools/probe.py --sft_dir results/ckpt/sft_s0 --threads 1 --out results/probe/probe_s0.json
At RFT's own budget of image prompts (600 steps of about 3 states, 8 samples each; 45 s):
    python tools/probe.py --sft_dir results/ckpt/sft_s0 --steps 600 --batch_size 3 --samples 8
The root errors and the score diagnostics alone (1 min):
    python tools/probe.py --sft_dir results/ckpt/sft_s0 --objectives 6d --steps 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

# run as `python tools/<name>.py` from anywhere: the repository's modules are one directory up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import body
import data
import hygrpo
import metrics
import model
import plumbing
import posebench
import presets
import rewards
import train_sft

OBJECTIVES = ("6d", "eq7", "reward", "pa", "eq7+pa", "eq7_true_root")
RIDGE_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_dir", default="ckpt/sft", help="train_sft.py's output directory (default: %(default)s)")
    p.add_argument("--preset", default="tiny", help="the checkpoint's preset (default: %(default)s)")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES,
                   help="objectives to follow (default: all)")
    p.add_argument("--steps", type=int, default=1000, help="exact-gradient steps per objective (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=128, help="training states per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, RFT's (default: %(default)s)")
    p.add_argument("--pose_temperature", type=float, default=0.3,
                   help="the `reward` objective samples the head at this temperature, RFT's (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="samples per state for `reward` (default: %(default)s)")
    p.add_argument("--n_states", type=int, default=6000,
                   help="training states cached, the split's first (default: %(default)s; every val pose is used)")
    p.add_argument("--score_states", type=int, default=250,
                   help="val states of the score diagnostics (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=20000,
                   help="posebench training poses, as SFT's (default: %(default)s)")
    p.add_argument("--n_val", type=int, default=1000, help="posebench val poses (default: %(default)s)")
    p.add_argument("--n_test", type=int, default=1000, help="posebench test poses (default: %(default)s)")
    p.add_argument("--eval_every", type=int, default=250, help="val evaluation interval (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="batch order and samples (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--out", default="", help="write the results here as JSON ('' : print only)")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.samples, args.n_states, args.eval_every) < 1:
        p.error("--steps, --batch_size, --samples, --n_states and --eval_every must be >= 1")
    if args.n_states < 10:
        p.error(f"--n_states {args.n_states}: the linear root probes need at least 10 training states (they choose "
                f"their lambda on a fifth of them)")
    if not os.path.isdir(args.sft_dir):
        p.error(f"--sft_dir {args.sft_dir} does not exist; train one with "
                f"`python train_sft.py --out_dir {args.sft_dir}`")
    return args


def cache_states(policy, tokenizer, split: str, cfg: posebench.BenchConfig, n: int | None = None) -> dict:
    """Teacher-forced `<POSE>` states (n, D) of the first n image-to-pose prompts of a split (None:
    all), the pose-aware encoder's flattened tokens f_b(x) of their images (n, L_b * C_b), and the
    targets: 6D pose (n, 144) and view-frame joints (n, 24, 3)."""
    samples = data.PoseBenchTasks(split, cfg).eval_samples("image_to_pose")[:n]
    h, pose6d = train_sft.pose_states(policy, tokenizer, samples, "cpu")
    return {"h": h, "f": pose_encoder_tokens(policy, samples), "pose6d": pose6d,
            "joints": torch.as_tensor(np.stack([s.joints for s in samples])).float()}


@torch.no_grad()
def pose_encoder_tokens(policy, samples, batch_size: int = 256) -> torch.Tensor:
    """(n, L_b * C_b) float32: f_b(x) of the samples' images, flattened, as PoseLlava computes it."""
    inner = policy.get_base_model().model
    dtype = next(inner.pose_tower.parameters()).dtype
    return torch.cat([inner.pose_features(data.images_to_pixels(np.stack([s.image for s in samples[i:i + batch_size]]))
                                          .to(dtype)).flatten(1).float() for i in range(0, len(samples), batch_size)])


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float):
    """Ridge regression y ~ x on standardised features with an unpenalised bias, in float64:
    returns predict(x_new) -> y_new."""
    mu, sd = x.double().mean(0), x.double().std(0)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))  # a constant feature stays as it is

    def design(rows):  # standardised features and a column of ones
        return torch.cat([(rows.double() - mu) / sd, rows.new_ones(len(rows), 1, dtype=torch.float64)], 1)

    z = design(x)
    penalty = lam * torch.eye(z.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0
    w = torch.linalg.solve(z.T @ z + penalty, z.T @ y.double())
    return lambda x_new: (design(x_new) @ w).float()


def linear_root_probe(x_train, pose6d_train, x_val, pose6d_val, holdout: float = 0.2) -> dict:
    """How well the root (global orientation) can be read linearly from features: a ridge
    regression to the root's 6D, its lambda chosen on the last `holdout` of the training rows
    (never on val), refitted on all of them; root error on val in degrees."""
    cut = int(len(x_train) * (1 - holdout))
    root_train, root_val = pose6d_train[:, :model.ROOT_DIMS], pose6d_val[:, :model.ROOT_DIMS]
    held = {lam: root_angle_deg(ridge_fit(x_train[:cut], root_train[:cut], lam)(x_train[cut:]), root_train[cut:])
            .mean().item() for lam in RIDGE_LAMBDAS}
    lam = min(held, key=held.get)
    return {"lambda": lam, **angle_stats(root_angle_deg(ridge_fit(x_train, root_train, lam)(x_val), root_val))}


def angle_stats(err: torch.Tensor) -> dict:
    return {"median_deg": err.median().item(), "mean_deg": err.mean().item(),
            "frac_over_30_deg": (err > 30).float().mean().item(), "frac_over_90_deg": (err > 90).float().mean().item()}


def describe(stats: dict) -> str:
    return (f"median {stats['median_deg']:.1f} deg, mean {stats['mean_deg']:.1f}, "
            f"> 30 deg {100 * stats['frac_over_30_deg']:.1f} %, > 90 deg {100 * stats['frac_over_90_deg']:.1f} %")


def score_diagnostics(head, val: dict, bodymodel, pose_temperature: float, n: int, group: int = 8,
                      trials: int = 20, true_samples: int = 512, seed: int = 0) -> dict:
    """How much of the pose score is noise the rewards cannot see, and how well the group policy
    gradient of the mean points along the true gradient of the expected joint reward (module
    docstring), at the tempered head of the first n val states."""
    torch.manual_seed(seed)
    h, joints = val["h"][:n], val["joints"][:n]
    with torch.no_grad():
        dist = model.tempered(head.distribution(h), pose_temperature)
    mu = dist.mean.detach().clone().requires_grad_(True)
    dist = model.rebuilt(dist, mu)
    true = torch.zeros_like(mu)
    for _ in range(true_samples // 64):  # the true gradient of E[R_joint] by reparameterisation
        p = dist.rsample((64,))
        r = rewards.joint_reward(bodymodel.forward_rot6d(p.reshape(-1, p.shape[-1])).joints, joints.repeat(64, 1, 1))
        true += torch.autograd.grad(r.reshape(64, -1).mean(0).sum(), mu)[0]
    with torch.no_grad():
        cov = (dist.covariance_matrix if isinstance(dist, torch.distributions.LowRankMultivariateNormal)
               else torch.diag_embed(dist.variance)).double()
        fisher = torch.linalg.inv(cov)  # E[score score^T] of N(mu, Sigma)
        basis = model.rotation_basis(mu.double())
        seen = basis @ basis.transpose(-1, -2)
        unseen_share = 1 - (seen * fisher).sum((-2, -1)) / fisher.diagonal(dim1=-2, dim2=-1).sum(-1)
        marginal = model.projected(dist, basis.float())
        marg_prec = torch.linalg.inv(marginal.covariance_matrix.double())
        cosines = {"params": [], "rotations": []}
        for _ in range(trials):
            p = dist.sample((group,))  # (G, n, P)
            r = rewards.joint_reward(bodymodel.forward_rot6d(p.reshape(-1, p.shape[-1])).joints, joints.repeat(group,
                                                                                                               1, 1))
            adv = hygrpo.group_advantages(r.reshape(group, -1).T.double())  # (n, G)
            dev = (p.double() - mu.double()).transpose(0, 1)  # (n, G, P)
            scores = {"params": dev @ fisher,  # grad_mu log N(p; mu, Sigma) = Sigma^-1 (p - mu)
                      "rotations": dev @ basis @ marg_prec @ basis.transpose(-1, -2)}  # U (U^T Sigma U)^-1 U^T (p - mu)
            for k, sc in scores.items():
                estimate = (adv[..., None] * sc).mean(1)
                cosines[k].append(torch.nn.functional.cosine_similarity(estimate, true.double(), dim=-1))
    return {"fisher_share_unseen": unseen_share.mean().item(), "states": n, "group": group,
            **{f"cosine_{k}": torch.stack(v).mean().item() for k, v in cosines.items()}}


def objective_loss(name: str, head, h, pose6d, joints, bodymodel, pose_temperature: float = 0.3,
                   samples: int = 8) -> torch.Tensor:
    """The loss whose exact gradient the probe follows (see the module docstring)."""
    dist = head.distribution(h)
    mu = dist.mean
    if name == "6d":
        return ((mu - pose6d) ** 2).mean()
    if name == "reward":
        p = model.tempered(dist, pose_temperature).rsample((samples,)).reshape(-1, mu.shape[-1])
        return -rewards.joint_reward(bodymodel.forward_rot6d(p).joints, joints.repeat(samples, 1, 1)).mean()
    if name == "eq7_true_root":
        mu = torch.cat([pose6d[:, :model.ROOT_DIMS], mu[:, model.ROOT_DIMS:]], 1)
    pred = bodymodel.forward_rot6d(mu).joints
    if name in ("eq7", "eq7_true_root"):
        return rewards.joint_distance_m(pred, joints).mean()
    if name == "pa":
        return rewards.joint_distance_m(pred, joints, align="procrustes").mean()
    if name == "eq7+pa":
        return (rewards.joint_distance_m(pred, joints) + rewards.joint_distance_m(pred, joints,
                                                                                  align="procrustes")).mean()
    raise ValueError(f"objective_loss: unknown objective {name!r}; expected one of {OBJECTIVES}")


@torch.no_grad()
def val_metrics(head, val: dict, bodymodel) -> dict:
    pred = bodymodel.forward_rot6d(head.distribution(val["h"]).mean).joints
    return {"mpjpe_mm": metrics.mpjpe_mm(pred, val["joints"]).mean().item(),
            "pa_mpjpe_mm": metrics.pa_mpjpe_mm(pred, val["joints"]).mean().item()}


@torch.no_grad()
def root_error_deg(head, val: dict) -> torch.Tensor:
    """(n,) geodesic angle in degrees between the head's mean root rotation and the true one."""
    return root_angle_deg(head.distribution(val["h"]).mean[:, :model.ROOT_DIMS], val["pose6d"][:, :model.ROOT_DIMS])


def root_angle_deg(pred6d: torch.Tensor, true6d: torch.Tensor) -> torch.Tensor:
    """(n,) geodesic angle in degrees between two (n, 6) rotations (6D, Gram-Schmidt'ed)."""
    r_pred, r_true = body.rot6d_to_matrix(pred6d.double()), body.rot6d_to_matrix(true6d.double())
    cos = ((r_pred.transpose(-1, -2) @ r_true).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def follow(name: str, sft_head, train: dict, val: dict, bodymodel, args) -> list:
    """Fine-tune a copy of the SFT head on one objective; [(step, val metrics)] from step 0.
    Only the mean network is trained, except for `reward` (the covariance shapes the samples)."""
    head = copy.deepcopy(sft_head)
    params = list(head.parameters()) if name == "reward" else list(head.mlp.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    curve = [(0, val_metrics(head, val, bodymodel))]
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train["h"]), (args.batch_size,), generator=g)
        loss = objective_loss(name, head, train["h"][idx], train["pose6d"][idx], train["joints"][idx], bodymodel,
                              args.pose_temperature, args.samples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, val_metrics(head, val, bodymodel)))
            m = curve[-1][1]
            print(f"  {name:14s} step {step:5d}  val MPJPE {m['mpjpe_mm']:7.2f}  PA-MPJPE {m['pa_mpjpe_mm']:7.2f}",
                  flush=True)
    return curve


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    policy, tokenizer, step_dir = presets.load_policy(args.sft_dir, args.preset)
    policy.eval()
    head = presets.trained_pose_head(policy)
    if head.deterministic and "reward" in args.objectives:
        raise SystemExit(f"{args.sft_dir} has a deterministic head: the `reward` objective needs a Gaussian one")
    sft_head = copy.deepcopy(head).float().requires_grad_(True)
    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    train = cache_states(policy, tokenizer, "train", cfg, args.n_states)
    val = cache_states(policy, tokenizer, "val", cfg)
    del policy
    bodymodel = body.BodyModel()
    root = angle_stats(root_error_deg(sft_head, val))
    probes = {where: linear_root_probe(train[k], train["pose6d"], val[k], val["pose6d"])
              for where, k in (("pose_states", "h"), ("pose_encoder", "f"))}
    print(f"{step_dir}: {len(train['h'])} train / {len(val['h'])} val states cached in {time.time() - t0:.0f} s; "
          f"root error on val:\n  {'the SFT head mean:':52s}{describe(root)}", flush=True)
    for where, what in (("pose_states", "<POSE> states"), ("pose_encoder", "the pose encoder's tokens f_b(x)")):
        label = f"a linear probe of {what}:"
        print(f"  {label:52s}{describe(probes[where])} (ridge lambda {probes[where]['lambda']:g})")
    score = score_diagnostics(sft_head, val, bodymodel, args.pose_temperature, args.score_states)
    print(f"pose score at tau = {args.pose_temperature:g}, {score['states']} val states: "
          f"{100 * score['fisher_share_unseen']:.1f} % of its expected squared norm lies in the 72 directions no "
          f"rotation depends on; cosine of the group policy gradient (G = {score['group']}) of the mean with the true "
          f"gradient: {score['cosine_params']:.3f} (--pose_space params), {score['cosine_rotations']:.3f} "
          f"(--pose_space rotations)", flush=True)
    results = {"sft_dir": args.sft_dir, "args": vars(args), "root_error": root, "root_probes": probes,
               "score": score, "curves": {}}
    for name in args.objectives:
        results["curves"][name] = follow(name, sft_head, train, val, bodymodel, args)
    start = results["curves"][args.objectives[0]][0][1]
    print(f"\nval, SFT head: MPJPE {start['mpjpe_mm']:.2f} mm, PA-MPJPE {start['pa_mpjpe_mm']:.2f} mm; "
          f"change after {args.steps} exact-gradient steps (batch {args.batch_size}, lr {args.lr:g}):")
    print(f"{'objective':16s} {'MPJPE':>8s} {'PA-MPJPE':>9s}")
    for name, curve in results["curves"].items():
        end = curve[-1][1]
        d_mpjpe, d_pa = end["mpjpe_mm"] - start["mpjpe_mm"], end["pa_mpjpe_mm"] - start["pa_mpjpe_mm"]
        print(f"{name:16s} {d_mpjpe:+8.2f} {d_pa:+9.2f}")
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        plumbing.atomic_write(args.out, lambda fh: json.dump(results, fh, indent=1))
    return results


if __name__ == "__main__":
    main()

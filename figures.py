"""The figures: Figure 4 (reward curves, GRPO vs HyGRPO, mean over seeds) from the runs'
metrics.jsonl, one run's reward curves (train_rft.py), and Figures 5 and 6 (rendered poses: ground
truth, SFT, Pose-RFT) from the evaluations' predictions.npz."""
from __future__ import annotations

import json
import math
import os
import textwrap
import warnings

import numpy as np

PAPER_REWARDS = ("joint", "semantic", "format", "text")  # rewards.REWARD_NAMES: Figure 4's panels


def reward_rows(metrics_path: str) -> list:
    """The logged training steps of a train_rft.py metrics.jsonl."""
    with open(metrics_path) as fh:
        return [r for r in map(json.loads, fh) if "rewards/format" in r]


def nanmean(a, axis=None):
    """np.nanmean without the warning on all-NaN slices (a reward never logged gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis)


def smooth(values: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over k logged steps, NaN (no value logged) ignored."""
    return np.array([nanmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))])


def seed_curves(seeds: list, name: str):
    """(steps (n,), values (seeds, n)) of one reward, at the steps every seed logged (a step skipped
    for NaN rewards in one seed is left out of all); NaN where the reward was not measured."""
    by_step = [{r["step"]: r for r in rows} for rows in seeds]
    steps = sorted(set.intersection(*(set(b) for b in by_step)))
    key = f"rewards/{name}"
    vals = [[np.nan if b[t].get(key) is None else b[t][key] for t in steps] for b in by_step]
    return np.array(steps), np.array(vals, dtype=float).reshape(len(seeds), len(steps))


def plot_figure4(curves: dict, png: str, names=PAPER_REWARDS) -> None:
    """Figure 4: reward curves of GRPO vs HyGRPO. curves {label: [rows of each seed]} -> PNG, one panel
    per reward of `names` (the paper's four, rewards.REWARD_NAMES): the moving average over a tenth of the
    run, mean over seeds with a ± std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, name in zip(axes, names):
        for label, seeds in curves.items():
            steps, vals = seed_curves(seeds, name)
            k = max(1, len(steps) // 10)
            sm = np.stack([smooth(v, k) for v in vals])
            mean = nanmean(sm, 0)
            line, = ax.plot(steps, mean, label=f"{label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            if len(seeds) > 1:
                sd = np.std(sm, 0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        unit = " (1/m)" if name == "joint" else ""
        ax.set_title(f"rewards/{name}{unit}", fontsize=10)
        ax.set_xlabel("RFT step")
    axes[0].legend(fontsize=8)
    fig.suptitle("Figure 4: training rewards, GRPO (text only) vs HyGRPO (text + pose); "
                 "moving average over a tenth of the run", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def render_actions(bodymodel, pose6d, rot=None, distance_m: float = 4.0, size: int = 128):
    """Renders actions (N, P) with the benchmark's renderer: body posed, pelvis at the origin, rotated by
    `rot` (3, 3) world -> view (None: the action's own frame is the view frame). Returns (N, size, size, 3) uint8."""
    import torch

    import render

    with torch.no_grad():
        out = bodymodel.forward_rot6d(torch.as_tensor(np.asarray(pose6d), dtype=torch.float32).reshape(len(pose6d), -1))
        verts = out.vertices - out.joints[:, :1]  # (N, V, 3)
        if rot is not None:
            verts = verts @ torch.as_tensor(rot, dtype=torch.float32).T
        return render.render(verts, torch.full((len(verts),), distance_m), bodymodel.faces,
                             render.face_colours(bodymodel), size, 2).numpy()


def plot_poses(task: str, inputs: list, rows: dict, png: str, title: str) -> None:
    """A grid: the inputs (images or captions) on top, then one row of renders per entry of `rows`
    ({label: (K, H, W, 3) uint8}), one column per example."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(inputs)
    fig, axes = plt.subplots(1 + len(rows), K, figsize=(2.3 * K, 2.3 * (1 + len(rows)) + 0.4), squeeze=False)
    for j in range(K):
        ax = axes[0, j]
        ax.set_xticks([])
        ax.set_yticks([])
        if task == "image_to_pose":
            ax.imshow(inputs[j], interpolation="nearest")
        else:
            ax.text(0.5, 0.5, "\n".join(textwrap.wrap(inputs[j], 28)), ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
        for i, (label, images) in enumerate(rows.items(), start=1):
            axes[i, j].imshow(images[j])
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=9)
    axes[0, 0].set_ylabel("input image" if task == "image_to_pose" else "caption", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def pose_figures(args, seed: int) -> dict:
    """Figures 5 (text-to-pose) and 6 (image-to-pose): the first n_figure test examples; ground
    truth, SFT and Pose-RFT (the head's mean, from each run's predictions.npz). `args`: report.py's (the
    benchmark sizes, out_dir, n_figure). Returns {task: png}."""
    import torch

    import body
    import data
    import posebench
    import render

    cfg = posebench.BenchConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    tasks = data.PoseBenchTasks("test", cfg)
    bm = body.BodyModel(cfg.smpl_path)
    preds = {label: np.load(os.path.join(args.out_dir, "eval", f"{kind}_s{seed}", "predictions.npz"))
             for label, kind in (("SFT", "sft"), ("Pose-RFT", "rft"))}
    oblique = render.view_rotation(torch.tensor([math.radians(30.0)]), torch.tensor([math.radians(15.0)]))[0]
    out = {}
    for task, fig_no, what in (("text_to_pose", 5, "captions"), ("image_to_pose", 6, "test images")):
        samples = tasks.eval_samples(task)
        K = min(args.n_figure, *(len(p[f"{task}/index"]) for p in preds.values()))
        rot = oblique if task == "text_to_pose" else None  # canonical poses seen from the front-left; image: its camera
        rows = {"ground truth": render_actions(bm, np.stack([samples[i].pose6d for i in range(K)]), rot)}
        for label, p in preds.items():
            assert list(p[f"{task}/index"][:K]) == list(range(K)), "predictions are not in test order"
            rows[label] = render_actions(bm, p[f"{task}/pose6d"][:K], rot)
        inputs = [samples[i].image if task == "image_to_pose" else samples[i].text for i in range(K)]
        png = os.path.join(args.out_dir, f"figure{fig_no}_{task}.png")
        plot_poses(task, inputs, rows, png, f"Figure {fig_no}: {task.replace('_', '-')} on fixed {what} "
                                            f"(seed {seed}; the pose is the head's mean)")
        out[task] = png
    return out


def plot_rewards(metrics_path: str, png_path: str, title: str) -> None:
    """A training run's reward curves (Fig. 4 style) from its metrics.jsonl: train_rft.py draws them at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if '"rewards/' in line]
    if not rows:
        return
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, name in zip(axes, PAPER_REWARDS):
        steps = [r["step"] for r in rows]
        values = np.array([np.nan if r.get(f"rewards/{name}") is None else r[f"rewards/{name}"] for r in rows])
        ax.plot(steps, values, alpha=0.3, label="per logged step")
        k = max(1, len(values) // 10)  # moving average over a tenth of the run
        ax.plot(steps, smooth(values, k), label=f"mean of {k}")
        ax.set_title(f"rewards/{name}")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

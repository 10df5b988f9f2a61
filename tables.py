"""Evaluation results on disk and on the page: the results.json record `evaluate.py` writes (with a kind
and version a reader checks) and the Markdown tables `evaluate.py` and `report.py` print, each metric
formatted by its unit (mm, degrees, %, cosines) with an arrow for the better direction."""
from __future__ import annotations

import json
import os
from typing import Iterable, Tuple

import numpy as np

import data
import plumbing

RETRIEVAL_KS = (5, 10, 20)
PROTOCOLS = ("full", "random")
DIRECTIONS = ("t2p", "p2t")


def metric_keys(retrievers: Iterable[str] = ("eval", "reward")) -> list:
    """Every metric name `evaluate.evaluate_policy` returns, in the order tables list them (evaluate.py's
    docstring explains each)."""
    keys = []
    for task in data.POSE_TASKS:
        keys += [f"{task}/mpjpe_mm", f"{task}/pa_mpjpe_mm", f"{task}/root_error_deg", f"{task}/gross_state_correct"]
    for r in retrievers:
        keys += [f"text_to_pose/{r}_retriever/{p}/R{d}@{k}"
                 for p in PROTOCOLS for d in DIRECTIONS for k in RETRIEVAL_KS]
    keys += [f"{t}/format_valid" for t in data.TASKS] + [f"{t}/answer_similarity" for t in data.TASKS]
    keys += ["vqa/yes_no_accuracy"]
    for task in data.POSE_TASKS:
        keys += [f"{task}/mean_pose_mpjpe_mm", f"{task}/mean_pose_pa_mpjpe_mm"]
    return keys


RESULTS_KIND = "pose-rft evaluate.py results"


RESULTS_VERSION = 1


def metric_format(key: str) -> Tuple[str, float, int]:
    """(row label, scale, decimals) of a metric: mm and Recall@K (%) as they are, fractions as %,
    cosines with 3 decimals; the arrow says which way is better."""
    if key.endswith("_mm"):
        unit, scale, decimals, better = "mm", 1.0, 1, "↓"
    elif key.endswith(("format_valid", "yes_no_accuracy", "gross_state_correct", "pose_rate", "archetype_accuracy",
                       "archetype_accuracy_true_poses", "consistency", "plausible", "posecode_truth")):
        unit, scale, decimals, better = "%", 100.0, 1, "↑"
    elif key.endswith("/pfd"):
        unit, scale, decimals, better = "distance", 1.0, 3, "↓"
    elif key.endswith("_similarity") and "abstract" in key:
        unit, scale, decimals, better = "cos", 1.0, 3, "↑"
    elif key.endswith("_deg"):
        unit, scale, decimals, better = "deg", 1.0, 1, "↓"
    elif key.endswith("answer_similarity"):
        unit, scale, decimals, better = "cos", 1.0, 3, "↑"
    else:  # Recall@K, already in percent
        unit, scale, decimals, better = "%", 1.0, 1, "↑"
    return f"`{key}` ({unit}) {better}", scale, decimals


def format_cell(values, scale: float = 1.0, decimals: int = 1) -> str:
    """One table cell from the values of one metric over seeds: "v", "mean ± std" (sample std,
    ddof 1) for several, "-" when there is none (None values are left out)."""
    vals = [float(v) * scale for v in (values if isinstance(values, (list, tuple)) else [values]) if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{decimals}f}"
    return f"{np.mean(vals):.{decimals}f} ± {np.std(vals, ddof=1):.{decimals}f}"


def markdown_table(header: list, rows: list) -> str:
    """A GitHub Markdown table: header (C,) strings, rows (n, C) strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metrics_table(columns: list, keys: list | None = None, first: str = "metric") -> str:
    """Rows = metrics, columns = runs.

    Args:
        columns: [(label, metrics)] with metrics a {name: value} dict or a list of them (seeds:
            the cell is mean ± std).
        keys: metric names in row order (default: `metric_keys()` present in any column).
    """
    runs = [(label, m if isinstance(m, list) else [m]) for label, m in columns]
    if keys is None:
        keys = [k for k in metric_keys() if any(k in m for _, ms in runs for m in ms)]
    rows = []
    for k in keys:
        label, scale, decimals = metric_format(k)
        rows.append([label] + [format_cell([m.get(k) for m in ms], scale, decimals) for _, ms in runs])
    return markdown_table([first] + [label for label, _ in runs], rows)


def results_markdown(record: dict) -> str:
    """results.md: what was evaluated, then one column of metrics (posebench's or `evaluate_real`'s)."""
    column = [(os.path.basename(record["ckpt"].rstrip("/")) or "value", record["metrics"])]
    head = f"# Evaluation of `{record['ckpt']}`\n\nCheckpoint {record['step']}, preset `{record['preset']}`, "
    tail = f"; {record['world_size']} process(es), {record['time_s']:.0f} s.\n\n"
    if "datasets" in record:  # evaluate_real
        sets = ", ".join(f"{k.split('/', 1)[1]} ({n} samples)" for k, n in record["datasets"].items())
        return head + f"{sets}, {record['pose']} of the head" + tail + metrics_table(column, list(record["metrics"]))
    b = record["bench"]
    head += (f"{record['split']} split of posebench "
             f"(train {b['n_train']}, val {b['n_val']}, test {b['n_test']}; key {record['bench_key']}): "
             f"{record['eval_samples']} poses per pose task ({record['pose']} of the head), "
             f"{record['eval_generate']} greedy answers per task")
    return head + tail + metrics_table(column)


def write_results(out_dir: str, record: dict, predictions: dict | None = None) -> str:
    """Writes out_dir/results.json (the record), results.md and predictions.npz (the predictions that
    `evaluate_policy` / `evaluate_real` return: {set: {"index", "pose6d"}} and posebench's "answers").
    Returns results.json's path."""
    os.makedirs(out_dir, exist_ok=True)
    if predictions is not None:
        arrays = {f"{t}/{k}": v.numpy() for t, d in predictions.items() if t != "answers" for k, v in d.items()}
        arrays.update({f"answers/{t}": np.array(a, dtype=str) for t, a in predictions.get("answers", {}).items()})
        plumbing.atomic_write(os.path.join(out_dir, "predictions.npz"), lambda fh: np.savez(fh, **arrays), binary=True)
    plumbing.atomic_write(os.path.join(out_dir, "results.md"), lambda fh: fh.write(results_markdown(record)))
    path = os.path.join(out_dir, "results.json")
    plumbing.atomic_write(path, lambda fh: json.dump(record, fh, indent=1))  # last: marks completion
    return path


def load_results(path: str, preset: str | None = None, bench: dict | None = None) -> dict:
    """Reads a results.json of `evaluate.py --ckpt`, checking that it is one and, if given, that it
    was computed for this preset and this benchmark (n_train, n_val, n_test).

    Raises:
        FileNotFoundError / ValueError: naming the file and the fix.
    """
    fix = "rerun `python evaluate.py --ckpt RUN_DIR --out_dir DIR` (or `python report.py --force`)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; {fix}")
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete it and {fix}") from None
    if not isinstance(record, dict) or record.get("kind") != RESULTS_KIND or "metrics" not in record:
        raise ValueError(f"{path} is not a results file of evaluate.py; delete it and {fix}")
    if record.get("version") != RESULTS_VERSION:
        raise ValueError(f"{path} was written by another version of evaluate.py; delete it and {fix}")
    if preset is not None and record.get("preset") != preset:
        raise ValueError(f"{path} holds results of the '{record.get('preset')}' preset (checkpoint "
                         f"{record.get('ckpt')}), but the '{preset}' preset was asked for; delete it, or {fix} "
                         f"on a {preset} checkpoint")
    if bench is not None and {k: record.get("bench", {}).get(k) for k in bench} != bench:
        raise ValueError(f"{path} was computed on another benchmark ({record.get('bench', 'real data')}), not {bench}; "
                         f"delete it and {fix}")
    return record


def direct_table(columns: list) -> str:
    """--algo direct beside HyGRPO and SFT. columns: [(label, [metrics of each seed])]; rows: the pose
    metrics, then text-to-pose R@10 by the evaluator and by the reward retriever (the one the direct gradient
    follows), so that gaming the reward retriever shows as a gap between the two."""
    keys = ["image_to_pose/mpjpe_mm", "image_to_pose/pa_mpjpe_mm", "text_to_pose/mpjpe_mm", "text_to_pose/pa_mpjpe_mm"]
    keys += [f"text_to_pose/{r}_retriever/full/R{d}@10" for d in DIRECTIONS for r in ("eval", "reward")]
    return metrics_table(columns, keys, first="metric (R@10: full protocol)")


ABSTRACT_KEYS = ["format_valid", "pose_rate", "archetype_accuracy", "consistency", "plausible",
                 "eval_retriever/reasoning_similarity", "reward_retriever/reasoning_similarity",
                 "eval_retriever/archetype_similarity", "reward_retriever/archetype_similarity",
                 "eval_retriever/pfd", "reward_retriever/pfd", "nearest_mpjpe_mm"]


def abstract_table(columns: list) -> str:
    """The abstract-prompt task (CoT-Pose), columns [(label, [metrics of each seed])], rows
    evaluate.py's abstract_to_pose/* metrics; the classifier's own accuracy on the split's true poses (its
    ceiling) follows the table."""
    keys = [f"abstract_to_pose/{k}" for k in ABSTRACT_KEYS]
    ceiling = [m.get("abstract_to_pose/archetype_accuracy_true_poses") for _, ms in columns for m in ms]
    table = metrics_table(columns, keys, first="metric")
    return (table + "\nThe archetype classifier (10 nearest training poses by joints) names the true poses of "
            f"the split at {format_cell(ceiling[:1], 100.0, 1)} %, its ceiling.\n")


def paired_difference(a: list, b: list, keys: list) -> list:
    """[{key: a - b}] per seed, for the keys both hold: a column "RFT - SFT, paired by seed"."""
    return [{k: a_m[k] - b_m[k] for k in keys if a_m.get(k) is not None and b_m.get(k) is not None}
            for a_m, b_m in zip(a, b)]


# Published numbers, on real data (PoseScript, PoseFix): beside ours for scale, not comparable.
P2T_PUBLISHED = [  # UniPose Table 2, pose-to-text on PoseScript: R-precision top-1/2/3, BLEU-4, ROUGE-L, METEOR
    ("PoseScript's captioner (UniPose Tab. 2)", (91.6, 95.6, 97.0, 12.9, 33.9, 34.2)),
    ("UniPose (UniPose Tab. 2)", (85.6, 95.2, 97.6, 12.1, 33.3, 30.8))]


EDIT_PUBLISHED = [  # MPJPE, PA-MPJPE (mm), R@1/5/10 (%) on the PoseFix set
    ("PoseLLaVA-Pose (PoseLLaVA Tab. 3)", (71.7, 52.1, 37.0, 56.0, 63.0)),
    ("PoseFix (PoseLLaVA Tab. 3)", (130.5, 94.09, 25.0, 38.0, 50.0)),
    ("UniPose (UniPose Tab. 5)", (270.3, 138.9, None, None, None)),
    ("PoseFix (UniPose Tab. 5)", (300.2, 144.1, None, None, None))]


def pose_to_text_table(sft: list, rft: list) -> str:
    """Pose-to-text: SFT, HyGRPO, their paired difference, the pose's own captions (the retriever's
    ceiling), chance, and the published systems (on PoseScript)."""
    import evaluate_tasks

    rp = [f"pose_to_text/eval_retriever/R-precision@{k}" for k in evaluate_tasks.R_PRECISION_KS]
    keys = [*rp, "pose_to_text/bleu4", "pose_to_text/rouge_l", "pose_to_text/meteor", "pose_to_text/posecode_truth",
            "pose_to_text/format_valid"]
    own = [{k: m.get(k.replace("R-precision", "reference_R-precision")) for k in rp} for m in sft]
    chance = {k: 100.0 * min(1.0, kk / 32) for k, kk in zip(rp, evaluate_tasks.R_PRECISION_KS)}
    columns = [("SFT", sft), ("Pose-RFT (HyGRPO)", rft), ("HyGRPO − SFT, paired", paired_difference(rft, sft, keys)),
               ("the pose's own captions", own), ("chance (32 candidates)", chance)]
    columns += [(label, dict(zip(keys, values))) for label, values in P2T_PUBLISHED]
    return metrics_table(columns, keys, first="metric (R-precision: evaluator retriever)")


def pose_edit_table(sft: list, rft: list) -> str:
    """Pose editing: SFT, HyGRPO, their paired difference, answering A unchanged, and the published
    systems (on the PoseFix set)."""
    import evaluate_tasks

    recall = [f"pose_edit/eval_retriever/R@{k}" for k in evaluate_tasks.EDIT_RECALL_KS]
    keys = ["pose_edit/mpjpe_mm", "pose_edit/pa_mpjpe_mm", *recall, "pose_edit/posecode_truth"]
    copy_key = {k: k.replace("retriever/", "retriever/copy_a_") if "retriever/" in k
                else k.replace("pose_edit/", "pose_edit/copy_a_") for k in keys[:-1]}  # what A unchanged scores
    copy_a = [{k: m.get(c) for k, c in copy_key.items()} for m in sft]
    columns = [("SFT", sft), ("Pose-RFT (HyGRPO)", rft), ("HyGRPO − SFT, paired", paired_difference(rft, sft, keys)),
               ("answering A unchanged", copy_a)]
    columns += [(label, dict(zip(keys, values))) for label, values in EDIT_PUBLISHED]
    return metrics_table(columns, keys, first="metric (R@K: evaluator retriever, groups of 100)")

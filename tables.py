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

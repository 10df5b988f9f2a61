"""The paper's metrics (§4.1 "Metrics"), as pure functions with input checks that name the
argument, its shape and what was expected. evaluate.py runs a policy through them; retrieval.py and
tools/probe.py call them directly. Each has a slow reference in tests/test_metrics.py.

- Image-to-pose: MPJPE and PA-MPJPE, in millimetres. MPJPE is pelvis-aligned (joint 0
  in the SMPL joint order); PA-MPJPE first applies a similarity Procrustes alignment
  (rotation, uniform scale, translation) of the prediction onto the ground truth.
- Text-to-pose: Recall@K, K = 5, 10, 20, in percent, for text-to-pose (T2P) and
  pose-to-text (P2T) retrieval under the two protocols of PoseScript (Delmas et al.
  2022): full retrieval (each query ranked among all N candidates,
  `recall_at_k`) and random sampling (each query ranked among its match plus 31
  randomly drawn others, `recall_at_k_random`).
- Pose-to-text (UniPose Table 2, PoseScript's protocol): R-precision top-1/2/3 (`r_precision`),
  BLEU-4 (`bleu4`), ROUGE-L (`rouge_l`), METEOR (`meteor`, nltk's, where nltk's WordNet data is
  installed: None elsewhere) and the share of stated posecodes true of the pose (`posecode_truth`).
- Pose editing (UniPose Table 5, PoseLLaVA Table 3): MPJPE / PA-MPJPE of the edited pose, the
  instruction's posecode truth (`posecode_truth`) and R@K of the edited pose among the true ones
  (`pose_recall_at_k`).
- Abstract prompts (CoT-Pose): PFD and MPJPE of a generated pose to the nearest pose of the
  prompt's archetype (`nearest_pfd`, `nearest_mpjpe_mm`, CoT-Pose's Table 1 metrics with the root aligned
  to the candidate's), and archetype accuracy by a k-nearest-neighbour classifier on joints (`knn_predict`).

Shape letters: N = samples (queries / candidates), J = joints.
"""
from __future__ import annotations

import numbers
from typing import Dict, Iterable, Tuple, Union

import numpy as np
import torch

import body

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = ["mpjpe_mm", "pa_mpjpe_mm", "procrustes_align", "recall_at_k", "recall_at_k_random", "r_precision", "bleu4",
           "rouge_l", "meteor", "posecode_truth", "pose_recall_at_k", "with_root", "nearest_pfd", "nearest_mpjpe_mm",
           "knn_predict"]

M_TO_MM = 1000.0


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _to_tensor(fn: str, name: str, x: ArrayLike) -> torch.Tensor:
    """Converts a torch tensor / numpy array / nested list of reals to a real tensor.

    Args:
        fn: Name of the calling public function (for error messages).
        name: Name of the argument (for error messages).
        x: The value to convert.

    Returns:
        A real-valued tensor (floating dtypes kept, others cast to float64).

    Raises:
        ValueError: If `x` cannot be read as an array of real numbers.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
            if arr.dtype == object:
                raise TypeError("object array")
            t = torch.as_tensor(arr)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{fn}: {name} must be a torch tensor or numpy array of real numbers, "
                f"got {type(x).__name__} ({err})"
            ) from None
    if t.is_complex():
        raise ValueError(f"{fn}: {name} has complex dtype {t.dtype} but expected real numbers")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_finite(fn: str, name: str, t: torch.Tensor, expected: str) -> None:
    """Raises ValueError if `t` holds NaN or inf, naming the argument and its shape."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"{fn}: {name} (shape {_shape(t)}) contains {n_nan} NaN and {n_inf} inf "
            f"value(s) but expected finite {expected}"
        )


def _check_joints(fn: str, pred: ArrayLike, gt: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validates a pair of joint arrays and returns them as float64 tensors.

    Args:
        fn: Name of the calling public function (for error messages).
        pred: Predicted joints, (N, J, 3) metres.
        gt: Ground-truth joints, (N, J, 3) metres.

    Returns:
        (pred, gt) as float64 tensors of shape (N, J, 3), on pred's device.

    Raises:
        ValueError: On a non-(N, J, 3) shape, empty N or J, a pred/gt shape mismatch,
            or NaN/inf values; the message names the argument, the shape received and
            the shape expected.
    """
    tensors = {"pred": _to_tensor(fn, "pred", pred), "gt": _to_tensor(fn, "gt", gt)}

    def ok(t: torch.Tensor) -> bool:
        return t.ndim == 3 and t.shape[2] == 3 and t.shape[0] >= 1 and t.shape[1] >= 1

    for name, other in (("pred", "gt"), ("gt", "pred")):
        t, o = tensors[name], tensors[other]
        if not ok(t):
            msg = f"{fn}: {name} has shape {_shape(t)} but expected (N, J, 3) with N >= 1, J >= 1"
            if ok(o):
                msg += f" and the same shape as {other} {_shape(o)}"
            raise ValueError(msg)
    p, g = tensors["pred"], tensors["gt"]
    if p.shape != g.shape:
        raise ValueError(
            f"{fn}: pred has shape {_shape(p)} but expected the same shape as "
            f"gt {_shape(g)} (both (N, J, 3))"
        )
    for name in ("pred", "gt"):
        _check_finite(fn, name, tensors[name], "joint positions in metres")
    return p.to(torch.float64), g.to(device=p.device, dtype=torch.float64)


def _check_sim(fn: str, sim: ArrayLike) -> torch.Tensor:
    """Validates a square similarity matrix.

    Args:
        fn: Name of the calling public function (for error messages).
        sim: Similarity matrix, (N, N) queries x candidates.

    Returns:
        sim as a floating-point tensor of shape (N, N) (floating dtypes are kept).

    Raises:
        ValueError: If sim is not square 2-D with N >= 1, or holds NaN/inf.
    """
    s = _to_tensor(fn, "sim", sim)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise ValueError(
            f"{fn}: sim has shape {_shape(s)} but expected a square (N, N) "
            f"query x candidate similarity matrix with N >= 1"
        )
    _check_finite(fn, "sim", s, "similarities")
    return s


def _check_ks(fn: str, ks: Union[int, Iterable[int]]) -> Tuple[int, ...]:
    """Validates the K values: a positive int or an iterable of positive ints."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError:
        raise ValueError(f"{fn}: ks must be an int or a sequence of ints, got {ks!r}") from None
    if not ks or not all(
        isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in ks
    ):
        raise ValueError(f"{fn}: ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return tuple(int(k) for k in ks)


def _check_positive_int(fn: str, name: str, value: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# Image-to-pose: MPJPE / PA-MPJPE
# --------------------------------------------------------------------------------------
def mpjpe_mm(pred: ArrayLike, gt: ArrayLike) -> torch.Tensor:
    """Pelvis-aligned mean per-joint position error.

    Joint 0 (the pelvis, SMPL joint order) is subtracted from every joint of pred and of
    gt, then the Euclidean joint distances are averaged over joints.

    Args:
        pred: Predicted joints, (N, J, 3) metres (torch tensor or numpy array).
        gt: Ground-truth joints, (N, J, 3) metres.

    Returns:
        Per-sample error, (N,) millimetres, float64 tensor.

    Raises:
        ValueError: On bad shapes or non-finite values.
    """
    p, g = _check_joints("mpjpe_mm", pred, gt)
    p = p - p[:, :1]  # (N, J, 3) pelvis-relative, m
    g = g - g[:, :1]
    return torch.linalg.vector_norm(p - g, dim=-1).mean(dim=1) * M_TO_MM  # (N,) mm


def procrustes_align(pred: ArrayLike, gt: ArrayLike) -> torch.Tensor:
    """Aligns pred to gt by a similarity transform (rotation, uniform scale, translation).

    Batched Umeyama / Kabsch via SVD of the 3x3 cross-covariance, with the reflection fix
    (the rotation always has det +1, so a mirrored pose is not aligned away).

    Args:
        pred: Predicted joints, (N, J, 3) metres (torch tensor or numpy array).
        gt: Ground-truth joints, (N, J, 3) metres.

    Returns:
        Aligned pred, (N, J, 3) metres, float64 tensor.

    Raises:
        ValueError: On bad shapes or non-finite values.
    """
    p, g = _check_joints("procrustes_align", pred, gt)
    return body.similarity_align(p, g)


def pa_mpjpe_mm(pred: ArrayLike, gt: ArrayLike) -> torch.Tensor:
    """Procrustes-aligned mean per-joint position error.

    Args:
        pred: Predicted joints, (N, J, 3) metres (torch tensor or numpy array).
        gt: Ground-truth joints, (N, J, 3) metres.

    Returns:
        Per-sample error after `procrustes_align`, (N,) millimetres, float64 tensor.

    Raises:
        ValueError: On bad shapes or non-finite values.
    """
    p, g = _check_joints("pa_mpjpe_mm", pred, gt)
    aligned = body.similarity_align(p, g)  # (N, J, 3) m
    return torch.linalg.vector_norm(aligned - g, dim=-1).mean(dim=1) * M_TO_MM  # (N,) mm


def root_error_deg(pred_rot: ArrayLike, gt_rot: ArrayLike) -> torch.Tensor:
    """Geodesic angle between predicted and true root (global) orientations.

    angle = arccos((tr(R_pred^T R_gt) - 1) / 2), the rotation that takes one to the other.

    Args:
        pred_rot: Predicted rotation matrices, (N, 3, 3).
        gt_rot: Ground-truth rotation matrices, (N, 3, 3).

    Returns:
        Per-sample angle, (N,) degrees in [0, 180], float64 tensor.

    Raises:
        ValueError: On bad shapes or non-finite values.
    """
    p = _to_tensor("root_error_deg", "pred_rot", pred_rot)
    g = _to_tensor("root_error_deg", "gt_rot", gt_rot)
    if p.dim() != 3 or p.shape[1:] != (3, 3) or p.shape != g.shape:
        raise ValueError(f"root_error_deg: pred_rot and gt_rot must both be (N, 3, 3), got {_shape(p)} and {_shape(g)}")
    _check_finite("root_error_deg", "pred_rot", p, "finite rotation matrices")
    _check_finite("root_error_deg", "gt_rot", g, "finite rotation matrices")
    cos = ((p.double().transpose(1, 2) @ g.double()).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2  # (N,)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def gross_state(joints: ArrayLike) -> np.ndarray:
    """The body's gross state by the benchmark's posecodes (posecodes.posecodes): 0 upright (spine
    within 20 degrees of vertical), 2 lying (beyond 65), 1 in between (leaning, bending).

    Args:
        joints: (N, J, 3) metres, pelvis-centred, in a frame whose +y is up (the benchmark's
            canonical frame; an image's view-frame pose rotated back by its camera).

    Returns:
        (N,) int array.
    """
    import posecodes

    j = _to_tensor("gross_state", "joints", joints)
    if j.dim() != 3 or j.shape[1:] != (body.NUM_JOINTS, 3):
        raise ValueError(f"gross_state: joints must be (N, {body.NUM_JOINTS}, 3), got {_shape(j)}")
    codes = posecodes.posecodes(j.double().cpu().numpy())
    upright, lying = (codes[:, posecodes.CODE_NAMES.index(c)] for c in ("upright", "lying"))
    return np.where(upright, 0, np.where(lying, 2, 1))


def gross_state_correct(pred_joints: ArrayLike, gt_joints: ArrayLike) -> float | None:
    """Share of the bodies whose ground truth is upright or lying (`gross_state` 0 or 2) whose
    prediction has that same posecode: a lying body answered upright, leaning or on its feet is
    wrong. Leaning ground truths (neither posecode) have no gross state to get right and are left
    out; None when none is left.

    Args:
        pred_joints, gt_joints: (N, J, 3) metres in a y-up frame (see `gross_state`).
    """
    gt = gross_state(gt_joints)
    keep = gt != 1
    return float(np.mean(gross_state(pred_joints)[keep] == gt[keep])) if keep.any() else None


# --------------------------------------------------------------------------------------
# Text-to-pose: Recall@K
# --------------------------------------------------------------------------------------
def _recall_percent(ranks: torch.Tensor, ks: Tuple[int, ...]) -> Dict[int, float]:
    """Percent of ranks (any shape, 0 = best) below each K."""
    return {k: float((ranks < k).to(torch.float64).mean()) * 100.0 for k in ks}


def recall_at_k(
    sim: ArrayLike, ks: Union[int, Iterable[int]] = (5, 10, 20)
) -> Dict[int, float]:
    """Recall@K under the full-retrieval protocol.

    Query i's true match is candidate i. Its rank is the number of candidates (among all
    N) with a strictly greater similarity than the match, so ties count in the match's
    favour; it is a hit at K if rank < K. For T2P pass sim[text, pose]; for P2T pass
    its transpose.

    Args:
        sim: Similarity matrix, (N, N) queries x candidates (torch tensor or numpy array).
        ks: The K values (ints >= 1).

    Returns:
        {K: recall in percent} as Python floats.

    Raises:
        ValueError: If sim is not square (N, N) with N >= 1, holds NaN/inf, or ks is bad.
    """
    fn = "recall_at_k"
    s = _check_sim(fn, sim)
    ks = _check_ks(fn, ks)
    match = s.diagonal().unsqueeze(1)  # (N, 1)
    ranks = (s > match).sum(dim=1)  # (N,)
    return _recall_percent(ranks, ks)


def recall_at_k_random(
    sim: ArrayLike,
    ks: Union[int, Iterable[int]] = (5, 10, 20),
    n_candidates: int = 32,
    n_repeats: int = 10,
    seed: int = 0,
) -> Dict[int, float]:
    """Recall@K under PoseScript's random-sampling protocol.

    Each query i is ranked among n_candidates candidates: its match (candidate i) plus
    n_candidates - 1 others drawn without replacement from the other N - 1. Rank and hit
    are as in `recall_at_k` (strictly greater similarities counted, hit if rank < K).

    Sampling (exactly, so that it can be reproduced): g = torch.Generator() seeded with
    `seed`; for each repeat r = 0..n_repeats-1 in turn,
    u = torch.rand(N, N, generator=g, dtype=torch.float32) on the CPU, its diagonal set
    to +inf, and query i's others are the first n_candidates - 1 entries of
    torch.argsort(u[i], stable=True), i.e. the n_candidates - 1 smallest u[i, j], j != i,
    ties broken by the smaller j. Memory is O(N^2) per repeat.

    Args:
        sim: Similarity matrix, (N, N) queries x candidates (torch tensor or numpy array).
        ks: The K values (ints >= 1).
        n_candidates: Candidates per query, the match included (PoseScript: 32).
        n_repeats: Number of independent draws; recall is averaged over queries and
            repeats.
        seed: Seed of the torch.Generator.

    Returns:
        {K: recall in percent} as Python floats.

    Raises:
        ValueError: If sim is not square (N, N), holds NaN/inf, N < n_candidates, or
            ks / n_candidates / n_repeats are bad.
    """
    fn = "recall_at_k_random"
    s = _check_sim(fn, sim)
    ks = _check_ks(fn, ks)
    n_candidates = _check_positive_int(fn, "n_candidates", n_candidates)
    n_repeats = _check_positive_int(fn, "n_repeats", n_repeats)
    n = s.shape[0]
    if n < n_candidates:
        raise ValueError(
            f"{fn}: sim has shape {_shape(s)}, i.e. N = {n}, but the random-sampling "
            f"protocol ranks each query among n_candidates = {n_candidates} candidates "
            f"and so needs N >= {n_candidates}"
        )
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    match = s.diagonal().unsqueeze(1)  # (N, 1)
    ranks = []
    for _ in range(n_repeats):
        u = torch.rand(n, n, generator=g, dtype=torch.float32)  # (N, N)
        u.fill_diagonal_(float("inf"))
        others = torch.argsort(u, dim=1, stable=True)[:, : n_candidates - 1]  # (N, C-1)
        others = others.to(s.device)
        ranks.append((s.gather(1, others) > match).sum(dim=1))  # (N,)
    return _recall_percent(torch.stack(ranks), ks)  # over (n_repeats, N)


# --------------------------------------------------------------------------------------
# Pose as input: pose-to-text and pose editing
# --------------------------------------------------------------------------------------
def r_precision(sim: ArrayLike, ks: Union[int, Iterable[int]] = (1, 2, 3), n_repeats: int = 10,
                seed: int = 0) -> Dict[int, float]:
    """R-precision top-K of generated texts, PoseScript's protocol (UniPose Table 2): each generated
    text ranks its own pose among it and 31 others drawn at random, by a retriever's similarity;
    top-K is the percent of texts whose pose ranks within the first K, averaged over `n_repeats`
    draws. That is `recall_at_k_random(sim, ks, 32, n_repeats, seed)` of sim[text, pose].

    Args:
        sim: (N, N) similarities, generated text i x pose j (N >= 32).
    Returns:
        {K: percent}.
    """
    return recall_at_k_random(sim, ks, n_candidates=32, n_repeats=n_repeats, seed=seed)


def _words(text: str) -> list:
    """BLEU's tokens: words and punctuation marks, case kept (data.normalize_text's pieces; on
    posebench's texts the same as sacrebleu's default 13a tokenizer)."""
    import re

    return re.findall(r"\w+|[^\w\s]", text)


def _ngrams(tokens: list, n: int) -> Dict[tuple, int]:
    out: Dict[tuple, int] = {}
    for i in range(len(tokens) - n + 1):
        g = tuple(tokens[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def bleu4(hypotheses: list, references: list) -> float:
    """Corpus BLEU-4 in percent, as sacrebleu computes it by default (Papineni et al. 2002):
    BP * exp(mean over n = 1..4 of log p_n), p_n = the hypotheses' n-grams matched in their references
    (each n-gram's count clipped at its largest count in one reference) over the hypotheses' n-grams,
    summed over the corpus; BP = exp(1 - r / c) if c < r else 1, c the hypotheses' length and r the
    sum of each hypothesis' closest reference length (the shorter on a tie). A p_n with no match is
    smoothed as sacrebleu's "exp" does: 1 / (2^k total_n), k counting the zero-match orders so far.

    Args:
        hypotheses: N strings. references: N lists of reference strings (at least one each).
    """
    if len(hypotheses) != len(references) or not hypotheses or any(not r for r in references):
        raise ValueError(f"bleu4: {len(hypotheses)} hypotheses and {len(references)} reference lists, each needing "
                         "at least one reference; expected the same number (>= 1)")
    match, total = [0] * 4, [0] * 4
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        h = _words(hyp)
        rs = [_words(x) for x in refs]
        c += len(h)
        r += min((abs(len(x) - len(h)), len(x)) for x in rs)[1]
        for n in range(1, 5):
            hg = _ngrams(h, n)
            best: Dict[tuple, int] = {}
            for x in rs:
                for g, k in _ngrams(x, n).items():
                    best[g] = max(best.get(g, 0), k)
            match[n - 1] += sum(min(k, best.get(g, 0)) for g, k in hg.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if c == 0:
        return 0.0
    logs, smooth = [], 1.0
    for m, t in zip(match, total):
        if t == 0:  # no hypothesis is long enough for this order: scored 0 here
            return 0.0
        if m == 0:
            smooth *= 2
            logs.append(np.log(1.0 / (smooth * t)))
        else:
            logs.append(np.log(m / t))
    bp = 1.0 if c >= r else float(np.exp(1 - r / c))
    return float(100.0 * bp * np.exp(np.mean(logs)))


def _lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypotheses: list, references: list) -> float:
    """ROUGE-L F-measure in percent, as the rouge-score package computes it (Lin 2004): tokens are the
    lower-cased runs of letters and digits (punctuation dropped); per hypothesis and reference,
    P = LCS / len(hypothesis), R = LCS / len(reference), F = 2 P R / (P + R) (0 if LCS = 0); with
    several references the best F (rouge-score's score_multi); the mean over hypotheses."""
    import re

    if len(hypotheses) != len(references) or not hypotheses or any(not r for r in references):
        raise ValueError(f"rouge_l: {len(hypotheses)} hypotheses and {len(references)} reference lists, each needing "
                         "at least one reference; expected the same number (>= 1)")
    tok = lambda t: re.findall(r"[a-z0-9]+", t.lower())  # noqa: E731
    scores = []
    for hyp, refs in zip(hypotheses, references):
        h, best = tok(hyp), 0.0
        for ref in refs:
            x = tok(ref)
            lcs = _lcs(h, x)
            if lcs:
                p, q = lcs / len(h), lcs / len(x)
                best = max(best, 2 * p * q / (p + q))
        scores.append(best)
    return float(100.0 * np.mean(scores))


def meteor(hypotheses: list, references: list, wordnet=None) -> float | None:
    """METEOR in percent (Banerjee and Lavie 2005) as nltk computes it (nltk.translate.meteor_score), the
    metric UniPose's Table 2 reports: unigrams aligned exactly, then by Porter stem, then by WordNet
    synonym; P and R the aligned share of the hypothesis and of the reference, Fmean = P R / (alpha P +
    (1 - alpha) R) with alpha 0.9; penalty = gamma (chunks / aligned)^beta with gamma 0.5, beta 3 (chunks:
    runs of aligned unigrams adjacent in both); score Fmean (1 - penalty), the best over a hypothesis's
    references, then the mean over hypotheses. Tokens as BLEU's (`_words`), lower-cased by nltk.

    Returns None where nltk or its WordNet data is not installed: METEOR's synonym stage needs WordNet
    (`python -c "import nltk; nltk.download('wordnet')"` on a machine with internet). `wordnet`: anything with
    nltk's `synsets(word)` in its place (the tests' stand-in)."""
    if len(hypotheses) != len(references) or any(not r for r in references):
        raise ValueError(f"meteor: {len(hypotheses)} hypotheses and {len(references)} reference lists, each needing "
                         "at least one reference")
    try:
        from nltk.translate.meteor_score import meteor_score
        if wordnet is None:
            from nltk.corpus import wordnet
            wordnet.synsets("pose")  # LookupError when the corpus is not installed
    except (ImportError, LookupError):
        return None
    if not hypotheses:
        return None
    scores = [meteor_score([_words(r) for r in refs], _words(h), wordnet=wordnet)
              for h, refs in zip(hypotheses, references)]
    return float(100.0 * np.mean(scores))


def posecode_truth(stated: list, codes: ArrayLike, code_names: Iterable[str]) -> float | None:
    """The share of stated posecodes that are true: sum over texts of the stated codes true of the
    text's pose, over the number of stated codes (a micro-average); None if no text states any.

    Args:
        stated: N lists of posecode names (posecodes.stated_codes of each text).
        codes: (N, C) bool, each pose's posecodes (posecodes.posecodes), columns in `code_names` order.
    """
    codes = np.asarray(codes, dtype=bool)
    col = {c: i for i, c in enumerate(code_names)}
    if codes.ndim != 2 or len(codes) != len(stated) or codes.shape[1] != len(col):
        raise ValueError(f"posecode_truth: codes of shape {codes.shape} for {len(stated)} texts and "
                         f"{len(col)} code names; expected ({len(stated)}, {len(col)})")
    n = sum(len(s) for s in stated)
    if n == 0:
        return None
    return float(sum(codes[i, col[c]] for i, s in enumerate(stated) for c in s) / n)


def pose_recall_at_k(sim: ArrayLike, ks: Union[int, Iterable[int]] = (1, 5, 10), group: int = 100) -> Dict[int, float]:
    """R@K of predicted poses retrieving their true pose (PoseLLaVA Table 3: "we used it to retrieve
    the corresponding true adjusted pose ... sampled 100 instances"): full retrieval
    (`recall_at_k`) within consecutive groups of `group` pairs, the recall averaged over all queries;
    the last, incomplete group is left out (all of them if N < group: then one group of N).

    Args:
        sim: (N, N) similarities, predicted pose i x true pose j.
    """
    s = _check_sim("pose_recall_at_k", sim)
    ks = _check_ks("pose_recall_at_k", ks)
    group = _check_positive_int("pose_recall_at_k", "group", group)
    n = s.shape[0]
    size = group if n >= group else n
    res = [recall_at_k(s[i:i + size, i:i + size], ks) for i in range(0, n - size + 1, size)]
    return {k: float(np.mean([r[k] for r in res])) for k in ks}



# --------------------------------------------------------------------------------------
# Abstract prompts (CoT-Pose): distances to the nearest pose of the archetype, archetype accuracy
# --------------------------------------------------------------------------------------
def with_root(pose6d: torch.Tensor, root6d: torch.Tensor) -> torch.Tensor:
    """(N, P) 6D poses with their global orientation (the first 6 numbers) replaced by root6d (N, 6):
    CoT-Pose aligns "the global root rotation of the predicted pose with that of the ground-truth"
    before every metric."""
    return torch.cat([root6d.to(pose6d), pose6d[:, 6:]], 1)


def _nearest(fn: str, pred6d, groups, cand6d, cand_groups, distance) -> torch.Tensor:
    pred6d, cand6d = torch.as_tensor(pred6d).float(), torch.as_tensor(cand6d).float()
    groups, cand_groups = np.asarray(groups), np.asarray(cand_groups)
    if pred6d.dim() != 2 or cand6d.dim() != 2 or pred6d.shape[1] != cand6d.shape[1] or pred6d.shape[1] % 6:
        raise ValueError(f"{fn}: pred6d {_shape(pred6d)} and cand6d {_shape(cand6d)} must be (N, P) and (M, P), "
                         "P = 6 J")
    if len(groups) != len(pred6d) or len(cand_groups) != len(cand6d):
        raise ValueError(f"{fn}: {len(groups)} groups for {len(pred6d)} poses and {len(cand_groups)} for {len(cand6d)} "
                         "candidates; expected one each")
    out = torch.full((len(pred6d),), float("nan"))
    for i in range(len(pred6d)):
        c = cand6d[torch.as_tensor(np.flatnonzero(cand_groups == groups[i]))]
        if len(c):  # the prediction once per candidate, with that candidate's root
            out[i] = distance(with_root(pred6d[i:i + 1].expand(len(c), -1), c[:, :6]), c).min()
    return out


def nearest_pfd(pred6d: ArrayLike, groups, cand6d: ArrayLike, cand_groups, embed_pose) -> torch.Tensor:
    """Pose feature distance (CoT-Pose, Table 1): "the distance between features extracted from
    ground-truth and generated poses using the pose encoder of the retrieval network", here the Euclidean
    distance between unit pose embeddings (`embed_pose`: (M, P) -> (M, D), normalised here) of the generated
    pose, its root aligned to the candidate's (`with_root`), and the candidate; the candidates are the poses
    of the same group (the prompt's archetype), and the nearest one counts (an abstract prompt has no single
    ground truth). In [0, 2]. Returns (N,); NaN where a group has no candidate."""
    def distance(a, b):
        ea, eb = (torch.nn.functional.normalize(torch.as_tensor(embed_pose(x)).float(), dim=-1) for x in (a, b))
        return (ea - eb).norm(dim=-1)
    return _nearest("nearest_pfd", pred6d, groups, cand6d, cand_groups, distance)


def nearest_mpjpe_mm(pred6d: ArrayLike, groups, cand6d: ArrayLike, cand_groups, joints_of) -> torch.Tensor:
    """MPJPE (mm, pelvis-centred) of the generated pose, its root aligned to the candidate's (`with_root`),
    to the nearest candidate of its group, `joints_of`: (M, P) 6D -> (M, J, 3) metres (the body model).
    Returns (N,); NaN where a group has no candidate."""
    def distance(a, b):
        return mpjpe_mm(torch.as_tensor(joints_of(a)).float(), torch.as_tensor(joints_of(b)).float())
    return _nearest("nearest_mpjpe_mm", pred6d, groups, cand6d, cand_groups, distance)


def knn_predict(train_x: ArrayLike, train_y, x: ArrayLike, k: int = 10, chunk: int = 512) -> np.ndarray:
    """k-nearest-neighbour classifier (Euclidean): the most frequent label among the k training rows
    nearest to each row of x (a tie: the label of the nearest of the tied), (N,). The abstract-prompt
    task's archetype classifier, on flattened canonical pelvis-centred joints of posebench's training split."""
    train_x, x = torch.as_tensor(np.asarray(train_x)).double(), torch.as_tensor(np.asarray(x)).double()
    train_y = np.asarray(train_y)
    if train_x.dim() != 2 or x.dim() != 2 or train_x.shape[1] != x.shape[1] or len(train_y) != len(train_x):
        raise ValueError(f"knn_predict: train_x {_shape(train_x)}, train_y ({len(train_y)},) and x {_shape(x)}: "
                         "expected (N, D), (N,) and (M, D)")
    k = min(_check_positive_int("knn_predict", "k", k), len(train_x))
    out = []
    for i in range(0, len(x), chunk):
        near = torch.cdist(x[i:i + chunk], train_x).topk(k, largest=False).indices.numpy()  # (m, k) nearest first
        for row in train_y[near]:
            labels, counts = np.unique(row, return_counts=True)
            best = set(labels[counts == counts.max()])
            out.append(next(y for y in row if y in best))
    return np.asarray(out, dtype=train_y.dtype)

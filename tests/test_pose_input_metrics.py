"""metrics.py's pose-to-text and editing metrics against hand-computed cases and slow
references: BLEU-4, ROUGE-L, METEOR, R-precision, posecode truth, pose R@K."""
import math

import numpy as np
import pytest
import torch

import metrics


def test_bleu4_hand_cases():
    # 1-4-gram matches 5/6, 3/5, 1/4, 0/3 (smoothed to 1/(2*3)); equal lengths: BP = 1
    assert metrics.bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(
        100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    # every n-gram matches, c = 4 < r = 6: BP = exp(1 - 6/4)
    assert metrics.bleu4(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(100 * math.exp(-0.5))
    # clipping at the largest count in one reference; closest reference length 3 (not 2): BP = 1;
    # zero matches at n = 3, 4 smoothed to 1/(2*2) and 1/(4*1)
    assert metrics.bleu4(["the the the the"], [["the cat", "the the mat"]]) == pytest.approx(
        100 * (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    # the corpus: counts and lengths summed before the means (9/10, 6/8, 3/6, 1/4; c = 10, r = 12)
    assert metrics.bleu4(["the cat sat on the mat", "the cat sat on"],
                         [["the cat is on the mat"], ["the cat sat on the mat"]]) == pytest.approx(
        100 * math.exp(1 - 12 / 10) * (9 / 10 * 6 / 8 * 3 / 6 * 1 / 4) ** 0.25)
    assert metrics.bleu4(["the cat"], [["the cat"]]) == 0.0  # no 3-gram at all
    assert metrics.bleu4(["The left knee is bent."], [["The left knee is bent."]]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.bleu4(["a"], [[]])


def test_rouge_l_hand_cases():
    # LCS "the cat on the mat" = 5 of 6 tokens each way; punctuation and case dropped
    assert metrics.rouge_l(["The cat sat on the mat."], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6)
    # the best reference counts; a hypothesis sharing nothing scores 0; the mean over hypotheses
    assert metrics.rouge_l(["The cat sat on the mat.", "dog"], [["a dog", "the cat is on the mat"], ["the cat"]]) == \
        pytest.approx(100 * (5 / 6 + 0) / 2)
    # P = 2/2, R = 2/4: F = 2/3
    assert metrics.rouge_l(["left knee"], [["the left knee bent"]]) == pytest.approx(100 * 2 / 3)


class NoSynonyms:
    """A WordNet without synonyms: METEOR's exact and stem stages alone, which a hand case can follow."""

    def synsets(self, word):
        return []


def test_meteor_hand_cases():
    pytest.importorskip("nltk")
    # tokens: the left arm is raised . / the left arm is up . -> 5 aligned of 6 each way, P = R = 5/6 = Fmean;
    # two chunks ("the left arm is", ".") of 5 aligned: penalty 0.5 (2/5)^3; the better of two references counts
    first = 5 / 6 * (1 - 0.5 * (2 / 5) ** 3)
    # "arms raising" / "arm raised": both aligned by Porter stem (arm, rais), one chunk of 2: penalty 0.5 (1/2)^3
    second = 1.0 * (1 - 0.5 * (1 / 2) ** 3)
    got = metrics.meteor(["The left arm is raised.", "arms raising"],
                         [["A person stands.", "the left arm is up."], ["arm raised"]], wordnet=NoSynonyms())
    assert got == pytest.approx(100 * (first + second) / 2)
    assert metrics.meteor(["dog"], [["the left knee"]], wordnet=NoSynonyms()) == 0.0
    with pytest.raises(ValueError, match="each needing at least one reference"):
        metrics.meteor(["a"], [[]], wordnet=NoSynonyms())


def test_meteor_is_none_without_wordnet(monkeypatch):
    """Where nltk's WordNet data is missing, METEOR is not computed (None), not computed without synonyms."""
    pytest.importorskip("nltk")
    import nltk.corpus

    class Missing:
        def synsets(self, word):
            raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(nltk.corpus, "wordnet", Missing())
    assert metrics.meteor(["the left arm"], [["the left arm"]]) is None


def slow_lcs(a, b):
    """Every subsequence of a, longest first (tiny inputs only)."""
    import itertools
    for n in range(len(a), 0, -1):
        for idx in itertools.combinations(range(len(a)), n):
            sub, it = [a[i] for i in idx], iter(b)
            if all(x in it for x in sub):
                return n
    return 0


def test_lcs_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = list(rng.integers(0, 3, rng.integers(0, 7)))
        b = list(rng.integers(0, 3, rng.integers(0, 7)))
        assert metrics._lcs(a, b) == slow_lcs(a, b)


def test_r_precision_is_the_32_candidate_protocol():
    n = 32
    sim = torch.eye(n)
    for i in range(n):
        sim[i, (i + 1) % n] = 2.0  # one other pose beats each text's own, and with N = 32 it is always drawn
    r = metrics.r_precision(sim)
    assert r[1] == 0.0 and r[2] == 100.0 and r[3] == 100.0
    assert metrics.r_precision(torch.eye(n) + 0.0)[1] == 100.0
    with pytest.raises(ValueError, match="N >= 32"):
        metrics.r_precision(torch.eye(31))


def test_posecode_truth_is_the_micro_average():
    codes = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]], bool)
    assert metrics.posecode_truth([["a", "b"], ["c"], []], codes, ["a", "b", "c"]) == pytest.approx(2 / 3)
    assert metrics.posecode_truth([[], [], []], codes, ["a", "b", "c"]) is None
    with pytest.raises(ValueError, match="expected"):
        metrics.posecode_truth([["a"]], codes, ["a", "b", "c"])


def test_pose_recall_at_k_against_a_loop():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(250, 250, generator=g) + 2 * torch.eye(250)
    hits = {1: [], 5: []}
    for start in (0, 100):  # two full groups of 100; the last 50 are left out
        for i in range(start, start + 100):
            rank = sum(sim[i, j] > sim[i, i] for j in range(start, start + 100))
            for k in hits:
                hits[k].append(rank < k)
    r = metrics.pose_recall_at_k(sim, (1, 5))
    assert r == {k: pytest.approx(100 * np.mean(v)) for k, v in hits.items()}
    small = metrics.pose_recall_at_k(sim[:10, :10], (1,))  # N < group: one group of all
    assert small[1] == pytest.approx(metrics.recall_at_k(sim[:10, :10], (1,))[1])

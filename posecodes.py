"""Posecodes: boolean facts about a body measured on its joints with clear-cut thresholds (an elbow
bent, a hand above the head, the body lying on its back; PoseScript's idea, Delmas et al. 2022), and
the texts posebench writes from them: captions that state 2-4 of a pose's true posecodes, yes/no
questions, and editing instructions that name the posecodes a pose gains; and the parsers that read
a caption or an instruction back to the posecodes it states (the metrics and rewards that check a
text against a pose)."""
from __future__ import annotations

import re

import numpy as np

import body


# ---- Posecodes and captions -----------------------------------------------------------------
# Thresholds: a posecode is stated only when clearly true; in between (e.g. an elbow at 130
# degrees), neither "bent" nor "straight" is said, as PoseScript leaves borderline cases out.

THRESH = {
    "elbow_bent_deg": 110, "elbow_straight_deg": 160, "knee_bent_deg": 120, "knee_straight_deg": 165,
    "above_head_m": 0.05, "raised_m": 0.05, "forward_m": 0.35, "behind_m": 0.12,
    "hands_together_m": 0.20, "hands_apart_m": 1.0, "feet_together_m": 0.20, "feet_apart_m": 0.55,
    "knee_raised_m": 0.10, "foot_raised_m": 0.25, "upright_deg": 20, "lying_deg": 65, "hips_low_m": 0.55,
}

# code: (statement variants for captions, negated statement, question)
_SIDED = {
    "{s}_elbow_bent": (["the {s} elbow is bent", "the {s} arm is bent at the elbow"],
                       "the {s} elbow is not bent", "Is the {s} elbow bent?"),
    "{s}_elbow_straight": (["the {s} arm is straight", "the {s} elbow is stretched"],
                           "the {s} arm is not straight", "Is the {s} arm straight?"),
    "{s}_knee_bent": (["the {s} knee is bent", "the {s} leg is bent at the knee"],
                      "the {s} knee is not bent", "Is the {s} knee bent?"),
    "{s}_knee_straight": (["the {s} leg is straight", "the {s} knee is extended"],
                          "the {s} leg is not straight", "Is the {s} leg straight?"),
    "{s}_hand_above_head": (["the {s} hand is above the head", "the {s} hand is raised over the head"],
                            "the {s} hand is not above the head", "Is the {s} hand above the head?"),
    "{s}_hand_raised": (["the {s} hand is higher than the shoulder", "the {s} hand is raised"],
                        "the {s} hand is not raised", "Is the {s} hand raised above the shoulder?"),
    "{s}_arm_forward": (["the {s} arm reaches forward", "the {s} hand is in front of the body"],
                        "the {s} arm does not reach forward", "Is the {s} arm reaching forward?"),
    "{s}_hand_behind": (["the {s} hand is behind the back", "the {s} hand is behind the body"],
                        "the {s} hand is not behind the body", "Is the {s} hand behind the body?"),
    "{s}_knee_raised": (["the {s} knee is raised", "the {s} thigh is lifted up"],
                        "the {s} knee is not raised", "Is the {s} knee raised?"),
    "{s}_foot_raised": (["the {s} foot is lifted", "the {s} foot is higher than the other"],
                        "the {s} foot is not lifted", "Is the {s} foot lifted higher than the other one?"),
}
_BODY = {
    "hands_together": (["the hands are close together", "both hands are near each other"],
                       "the hands are not close together", "Are the hands close together?"),
    "hands_apart": (["the hands are far apart", "the arms are spread wide"],
                    "the hands are not far apart", "Are the hands far apart?"),
    "feet_together": (["the feet are together", "the feet are close to each other"],
                      "the feet are not together", "Are the feet together?"),
    "feet_apart": (["the feet are wide apart", "the legs are spread apart"],
                   "the feet are not wide apart", "Are the feet wide apart?"),
    "upright": (["the torso is upright", "the person holds the back straight up"],
                "the torso is not upright", "Is the torso upright?"),
    "leaning_forward": (["the torso leans forward", "the person is bent forward"],
                        "the torso does not lean forward", "Is the torso leaning forward?"),
    "leaning_backward": (["the torso leans backward", "the person leans back"],
                         "the torso does not lean backward", "Is the torso leaning backward?"),
    "lying": (["the person is lying down", "the body is horizontal"],
              "the person is not lying down", "Is the person lying down?"),
    "lying_on_back": (["the person lies on the back", "the person is lying face up"],
                      "the person is not lying on the back", "Is the person lying on the back?"),
    "lying_on_front": (["the person lies on the stomach", "the person is lying face down"],
                       "the person is not lying on the stomach", "Is the person lying face down?"),
    "lying_on_side": (["the person lies on one side", "the person is lying sideways"],
                      "the person is not lying on a side", "Is the person lying on a side?"),
    "hips_low": (["the hips are low, close to the feet", "the person crouches low"],
                 "the hips are not low", "Are the hips low, close to the feet?"),
}
CODE_TEXT = dict(_BODY)
for _s in ("left", "right"):
    for _k, (_st, _neg, _q) in _SIDED.items():
        CODE_TEXT[_k.format(s=_s)] = ([t.format(s=_s) for t in _st], _neg.format(s=_s), _q.format(s=_s))
CODE_NAMES = tuple(sorted(CODE_TEXT))


def _angle_deg(a, b, c):
    """Interior angle at b of the triangle a-b-c, degrees; inputs (N, 3)."""
    u, v = a - b, c - b
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1) + 1e-9)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def posecodes(joints: np.ndarray) -> np.ndarray:
    """Measure every posecode on canonical, pelvis-centred joints (N, 24, 3) -> (N, C) bool,
    columns in CODE_NAMES order."""
    J = {n: joints[:, i] for i, n in enumerate(body.SMPL_JOINT_NAMES)}
    t = THRESH
    out = {}
    spine = J["neck"] - J["pelvis"]
    spine_n = spine / np.linalg.norm(spine, axis=-1, keepdims=True)
    tilt = np.degrees(np.arccos(np.clip(spine_n[:, 1], -1, 1)))  # angle of the spine to vertical
    across = J["left_hip"] - J["right_hip"]
    across /= np.linalg.norm(across, axis=-1, keepdims=True)
    front = np.cross(spine_n, across)  # the body's facing direction (y x x = -z for an upright body: flip)
    front = -front
    upright = tilt < t["upright_deg"]
    lying = tilt > t["lying_deg"]
    lowest_ankle = np.minimum(J["left_ankle"][:, 1], J["right_ankle"][:, 1])
    out.update({
        "upright": upright, "lying": lying,
        "leaning_forward": (~upright) & (~lying) & (spine_n[:, 2] > 0),
        "leaning_backward": (~upright) & (~lying) & (spine_n[:, 2] < 0),
        "lying_on_back": lying & (front[:, 1] > 0.7),
        "lying_on_front": lying & (front[:, 1] < -0.7),
        "lying_on_side": lying & (np.abs(across[:, 1]) > 0.7),
        "hands_together": np.linalg.norm(J["left_wrist"] - J["right_wrist"], axis=-1) < t["hands_together_m"],
        "hands_apart": np.linalg.norm(J["left_wrist"] - J["right_wrist"], axis=-1) > t["hands_apart_m"],
        "feet_together": np.linalg.norm(J["left_ankle"] - J["right_ankle"], axis=-1) < t["feet_together_m"],
        "feet_apart": np.linalg.norm(J["left_ankle"] - J["right_ankle"], axis=-1) > t["feet_apart_m"],
        "hips_low": (~lying) & (J["pelvis"][:, 1] - lowest_ankle < t["hips_low_m"]),
    })
    for s, o in (("left", "right"), ("right", "left")):
        elbow = _angle_deg(J[f"{s}_shoulder"], J[f"{s}_elbow"], J[f"{s}_wrist"])
        knee = _angle_deg(J[f"{s}_hip"], J[f"{s}_knee"], J[f"{s}_ankle"])
        out.update({
            f"{s}_elbow_bent": elbow < t["elbow_bent_deg"],
            f"{s}_elbow_straight": elbow > t["elbow_straight_deg"],
            f"{s}_knee_bent": knee < t["knee_bent_deg"],
            f"{s}_knee_straight": knee > t["knee_straight_deg"],
            f"{s}_hand_above_head": J[f"{s}_wrist"][:, 1] > J["head"][:, 1] + t["above_head_m"],
            f"{s}_hand_raised": J[f"{s}_wrist"][:, 1] > J[f"{s}_shoulder"][:, 1] + t["raised_m"],
            f"{s}_arm_forward": J[f"{s}_wrist"][:, 2] - J[f"{s}_shoulder"][:, 2] > t["forward_m"],
            f"{s}_hand_behind": upright & (J[f"{s}_wrist"][:, 2] < J["pelvis"][:, 2] - t["behind_m"]),
            f"{s}_knee_raised": (~lying) & (J[f"{s}_knee"][:, 1] > J[f"{s}_hip"][:, 1] - t["knee_raised_m"]),
            f"{s}_foot_raised": (~lying) & (J[f"{s}_ankle"][:, 1] > J[f"{o}_ankle"][:, 1] + t["foot_raised_m"]),
        })
    return np.stack([out[c] for c in CODE_NAMES], axis=1)


def make_captions(codes: np.ndarray, k: int, rng: np.random.Generator):
    """k captions per pose, each stating 2-4 of the pose's true posecodes (fewer if it has fewer).

    Returns (texts: list of n lists of k str, used: list of n lists of k lists of code names).
    """
    texts, used = [], []
    for row in codes:
        true = [CODE_NAMES[c] for c in np.flatnonzero(row)]
        pose_texts, pose_used = [], []
        for _ in range(k):
            m = min(len(true), int(rng.integers(2, 5)))
            chosen = [true[i] for i in rng.choice(len(true), size=m, replace=False)] if m else []
            clauses = [CODE_TEXT[c][0][int(rng.integers(len(CODE_TEXT[c][0])))] for c in chosen]
            if not clauses:
                text = "The person stands in a neutral position."
            elif len(clauses) == 1:
                text = clauses[0][0].upper() + clauses[0][1:] + "."
            else:
                text = ", ".join(clauses[:-1]) + " and " + clauses[-1]
                text = text[0].upper() + text[1:] + "."
            pose_texts.append(text)
            pose_used.append(chosen)
        texts.append(pose_texts)
        used.append(pose_used)
    return texts, used


def make_vqa(codes: np.ndarray, k: int, rng: np.random.Generator):
    """k yes/no questions per pose, half about true posecodes and half about false ones (in
    expectation). Returns a list of n lists of dicts {question, answer, code, value}."""
    out = []
    for row in codes:
        qa = []
        for _ in range(k):
            want = bool(rng.random() < 0.5)
            pool = np.flatnonzero(row == want)
            if len(pool) == 0:
                want, pool = not want, np.flatnonzero(row == (not want))
            c = CODE_NAMES[int(rng.choice(pool))]
            statements, negated, question = CODE_TEXT[c]
            answer = f"Yes, {statements[0]}." if want else f"No, {negated}."
            qa.append({"question": question, "answer": answer, "code": c, "value": want})
        out.append(qa)
    return out


# ---- Editing instructions, and parsing texts back to posecodes -------------------------------
# An instruction names the posecodes a pose gains, imperatively ("Raise the left hand above the head
# and bend the right knee."), each code in one of two wordings drawn per instruction, as the
# captions are (posebench.load_edits makes the pairs).

EDIT_MAX_CODES = 4
_SIDED_EDIT = {
    "{s}_elbow_bent": ["bend the {s} elbow", "bend the {s} arm at the elbow"],
    "{s}_elbow_straight": ["straighten the {s} arm", "stretch the {s} elbow"],
    "{s}_knee_bent": ["bend the {s} knee", "bend the {s} leg at the knee"],
    "{s}_knee_straight": ["straighten the {s} leg", "extend the {s} knee"],
    "{s}_hand_above_head": ["raise the {s} hand above the head", "lift the {s} hand over the head"],
    "{s}_hand_raised": ["raise the {s} hand higher than the shoulder", "lift the {s} hand"],
    "{s}_arm_forward": ["reach forward with the {s} arm", "bring the {s} hand in front of the body"],
    "{s}_hand_behind": ["put the {s} hand behind the back", "move the {s} hand behind the body"],
    "{s}_knee_raised": ["raise the {s} knee", "lift the {s} thigh up"],
    "{s}_foot_raised": ["lift the {s} foot", "raise the {s} foot higher than the other"],
}
EDIT_TEXT = {
    "hands_together": ["bring the hands close together", "move both hands near each other"],
    "hands_apart": ["move the hands far apart", "spread the arms wide"],
    "feet_together": ["put the feet together", "bring the feet close to each other"],
    "feet_apart": ["spread the feet wide apart", "spread the legs apart"],
    "upright": ["hold the torso upright", "straighten the back up"],
    "leaning_forward": ["lean the torso forward", "bend forward"],
    "leaning_backward": ["lean the torso backward", "lean back"],
    "lying": ["lie down", "bring the body horizontal"],
    "lying_on_back": ["lie on the back", "lie face up"],
    "lying_on_front": ["lie on the stomach", "lie face down"],
    "lying_on_side": ["lie on one side", "lie sideways"],
    "hips_low": ["lower the hips close to the feet", "crouch low"],
}
for _s in ("left", "right"):
    for _k, _v in _SIDED_EDIT.items():
        EDIT_TEXT[_k.format(s=_s)] = [t.format(s=_s) for t in _v]
assert set(EDIT_TEXT) == set(CODE_NAMES)


def _norm(text: str) -> str:
    """Lower case, words and punctuation marks joined by single spaces (as data.normalize_text)."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def _phrase_parser(table: dict):
    """A regex over every phrase of {code: [phrases]} (longest first, whole words) and phrase -> code."""
    owner = {}
    for code, phrases in table.items():
        for ph in phrases:
            key = _norm(ph)
            if owner.setdefault(key, code) != code:
                raise ValueError(f"the phrase {ph!r} names two posecodes: {owner[key]} and {code}")
    alts = sorted(owner, key=lambda k: (-len(k), k))
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(a) for a in alts) + r")(?!\w)"), owner


_CAPTION_PARSER = _phrase_parser({c: v[0] for c, v in CODE_TEXT.items()})
_EDIT_PARSER = _phrase_parser(EDIT_TEXT)


def stated_codes(text: str, kind: str = "caption") -> list:
    """The posecodes a caption (kind "caption": CODE_TEXT's statements) or an instruction ("edit":
    EDIT_TEXT's phrases) states, in order of appearance, each once. Exact on posebench's own texts
    (tests/test_pose_input.py parses every caption and instruction back); a text in other words
    states nothing that is not one of these phrases."""
    if kind not in ("caption", "edit"):
        raise ValueError(f"stated_codes: kind must be 'caption' or 'edit', got {kind!r}")
    regex, owner = _CAPTION_PARSER if kind == "caption" else _EDIT_PARSER
    out = []
    for m in regex.finditer(_norm(text)):
        if owner[m.group(1)] not in out:
            out.append(owner[m.group(1)])
    return out


def join_clauses(clauses: list) -> str:
    """"a, b and c." with the first letter upper-cased (the captions' form)."""
    text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return text[0].upper() + text[1:] + "."

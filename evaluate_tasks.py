"""Evaluation beyond posebench's three tasks of the paper, by the same code path as evaluate.py's
`evaluate_policy` (which calls the first two when the checkpoint trained those tasks): the pose-input
tasks (pose-to-text, pose editing: UniPose, PoseLLaVA, PoseFix), the abstract prompts (CoT-Pose, the pose
read after the policy's own reasoning), and the paper's real test sets (3DPW and Human3.6M by HMR2.0's
protocol, PoseScript-H2 text-to-pose). evaluate.py's module docstring names every metric."""
from __future__ import annotations

import numpy as np
import torch

import data
import evaluate
import model
import plumbing
import posecodes
import realdata
import rewards
from metrics import (bleu4, knn_predict, meteor, mpjpe_mm, nearest_mpjpe_mm, nearest_pfd, pa_mpjpe_mm, pose_recall_at_k,
                     posecode_truth, r_precision, rouge_l)


ABSTRACT_TOKENS = 64  # new tokens for a reasoning and the pose sentence


ARCHETYPE_KNN = 10


@torch.no_grad()
def generate_with_poses(policy, tokenizer, samples, device, max_new_tokens: int = ABSTRACT_TOKENS):
    """Greedy answers and the head's mean at the `<POSE>` state reached while generating them (model.sample):
    the pose follows the policy's own text, not the reference answer. Returns (texts, pose6d (N, P) zeros
    where there is no <POSE>, has_pose (N,) bool), on the CPU."""
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    texts, out = evaluate.greedy_sample(policy, tokenizer, samples, device, max_new_tokens)
    mean = inner.pose_head.distribution(out.states).mean.float()
    has = out.has_pose
    return texts, torch.where(has[:, None], mean, torch.zeros_like(mean)).cpu(), has.cpu()


@torch.no_grad()
def abstract_metrics(policy, tokenizer, split_tasks: data.PoseBenchTasks, train, bodymodel, device, retrievers: dict,
                     reasoning: bool = True, batch_size: int = 64):
    """The abstract-prompt task's metrics (the module docstring's abstract_to_pose/*), sharded like
    `evaluate_policy`. `train`: the training PoseBenchSplit (the classifier, the plausibility table, the
    prototypes). Returns (metrics, {"abstract_to_pose": {"index", "archetype", "pose6d", "has_pose"},
    "answers": {"abstract_to_pose": [str]}})."""
    task = data.ABSTRACT_TASK
    rank, world = plumbing.rank_and_world()
    samples = split_tasks.eval_samples(task)
    local, texts, poses, has = samples[rank::world], [], [], []
    for i in range(0, len(local), batch_size):
        t, p, h = generate_with_poses(policy, tokenizer, local[i:i + batch_size], device)
        texts, poses, has = texts + t, poses + [p], has + [h]
    texts = plumbing.gather_shards(texts, world)
    pose6d = plumbing.gather_shards(torch.cat([torch.zeros(0, model.POSE_DIM), *poses]), world)
    has = plumbing.gather_shards(torch.cat([torch.zeros(0, dtype=torch.bool), *has]), world)
    arch = np.array([s.archetype for s in samples])
    stats = rewards.ArchetypeStats(train)
    res = {f"{task}/format_valid": rewards.format_reward(
        texts, [task] * len(texts), [data.abstract_answer("A reasoning.", reasoning)] * len(texts)).mean().item(),
           f"{task}/pose_rate": has.float().mean().item()}
    joints_of = lambda p: evaluate.pose_joints(bodymodel, p, device)  # noqa: E731
    train_x = train.joints.reshape(len(train), -1)  # canonical, pelvis-centred
    pred_joints = joints_of(pose6d[has])
    guess = knn_predict(train_x, train.archetype, pred_joints.reshape(len(pred_joints), -1).double().numpy(),
                        ARCHETYPE_KNN) if has.any() else np.zeros(0)
    right = np.zeros(len(samples), bool)
    right[has.numpy()] = guess == arch[has.numpy()]
    d = split_tasks.data
    res[f"{task}/archetype_accuracy"] = float(right.mean())
    res[f"{task}/archetype_accuracy_true_poses"] = float(
        (knn_predict(train_x, train.archetype, d.joints.reshape(len(d), -1), ARCHETYPE_KNN) == d.archetype).mean())
    stated = [posecodes.stated_codes(data.reasoning_of(t)) for t, h in zip(texts, has.tolist()) if h]
    if reasoning:
        pred_codes = posecodes.posecodes(pred_joints.double().numpy())
        res[f"{task}/consistency"] = posecode_truth(stated, pred_codes, posecodes.CODE_NAMES) if stated else None
        res[f"{task}/plausible"] = posecode_truth(stated, stats.plausible[arch[has.numpy()]],
                                                  posecodes.CODE_NAMES) if stated else None
    else:
        res[f"{task}/consistency"] = res[f"{task}/plausible"] = None
    cand6d = torch.as_tensor(data.pose_aa_to_6d(d.pose_aa)).reshape(len(d), -1)
    q, qa = pose6d[has], arch[has.numpy()]
    for name, r in retrievers.items():
        key = f"{task}/{name}_retriever"
        if not len(q):
            res.update(dict.fromkeys([f"{key}/reasoning_similarity", f"{key}/archetype_similarity", f"{key}/pfd"]))
            continue
        emb = torch.nn.functional.normalize(r.embed_pose(q.to(device)).float().cpu(), dim=-1)
        reasons = [data.reasoning_of(t) or "." for t, h in zip(texts, has.tolist()) if h]
        res[f"{key}/reasoning_similarity"] = (rewards.semantic_reward(reasons, q.to(device), r).mean().item()
                                              if reasoning else None)
        res[f"{key}/archetype_similarity"] = (stats.prototypes(r)[torch.as_tensor(qa, dtype=torch.long)] * emb
                                              ).sum(-1).mean().item()
        res[f"{key}/pfd"] = nearest_pfd(q, qa, cand6d, d.archetype,
                                        lambda p: r.embed_pose(p.to(device)).float().cpu()).nanmean().item()
    res[f"{task}/nearest_mpjpe_mm"] = (nearest_mpjpe_mm(q, qa, cand6d, d.archetype, joints_of).nanmean().item()
                                       if len(q) else None)
    preds = {task: {"index": torch.tensor([s.index for s in samples]), "archetype": torch.as_tensor(arch),
                    "pose6d": pose6d, "has_pose": has}, "answers": {task: texts}}
    return res, preds


CAPTION_TOKENS = 48  # new tokens for a generated caption (posebench's longest is about 35 words and marks)


R_PRECISION_KS = (1, 2, 3)


EDIT_RECALL_KS = (1, 5, 10)


@torch.no_grad()
def pose_input_metrics(policy, tokenizer, split_tasks: data.PoseBenchTasks, bodymodel, device, n: int,
                       n_generate: int, retrievers: dict, batch_size: int = 64, sample_pose: bool = False,
                       seed: int = 0, pose_temperature: float = 1.0):
    """The pose-input tasks' metrics (the module docstring's pose_to_text/* and pose_edit/*): greedy
    captions of the first `n_generate` poses of the split, the edited pose of its first `n` editing
    pairs (the head's mean, or a seeded sample as `evaluate.predict_poses`). Sharded like `evaluate_policy`.
    Returns (metrics, {"pose_edit": {"index", "source", "pose6d"}, "answers": {"pose_to_text": [str]}})."""

    rank, world = plumbing.rank_and_world()
    d = split_tasks.data
    res = {}
    # pose -> text
    samples = split_tasks.eval_samples("pose_to_text")[:n_generate]
    local, texts = samples[rank::world], []
    for i in range(0, len(local), batch_size):
        texts += evaluate.generate_answers(policy, tokenizer, local[i:i + batch_size], device,
                                           max_new_tokens=CAPTION_TOKENS)
    texts = plumbing.gather_shards(texts, world)
    idx = [s.index for s in samples]
    if samples:
        refs = [d.captions[i] for i in idx]
        res["pose_to_text/bleu4"], res["pose_to_text/rouge_l"] = bleu4(texts, refs), rouge_l(texts, refs)
        res["pose_to_text/meteor"] = meteor(texts, refs)
        res["pose_to_text/posecode_truth"] = posecode_truth([posecodes.stated_codes(t) for t in texts], d.codes[idx],
                                                            posecodes.CODE_NAMES)
        res["pose_to_text/format_valid"] = rewards.format_reward(texts, ["pose_to_text"] * len(texts)).mean().item()
    poses = torch.as_tensor(np.stack([s.pose_input for s in samples])).reshape(len(samples), -1) if samples else None
    for name, r in retrievers.items():
        for what, captions in (("", texts), ("reference_", [s.answer for s in samples])):
            keys = [f"pose_to_text/{name}_retriever/{what}R-precision@{k}" for k in R_PRECISION_KS]
            if len(samples) < evaluate.RANDOM_PROTOCOL_MIN_N:
                res.update(dict.fromkeys(keys))
                continue
            sim = r.embed_text([c if c.strip() else "." for c in captions]) @ r.embed_pose(poses.to(device)).T
            res.update(zip(keys, r_precision(sim.float().cpu(), R_PRECISION_KS).values()))
    # pose editing
    samples = split_tasks.eval_samples("pose_edit")[:n]
    if not samples:
        raise ValueError(f"pose_input_metrics: no pose_edit samples to evaluate (n = {n})")
    local = evaluate.predict_poses(policy, tokenizer, samples[rank::world], device, batch_size, sample_pose, seed,
                                   pose_temperature)
    pose6d = plumbing.gather_shards(local, world)  # (N, P)
    pred = evaluate.pose_joints(bodymodel, pose6d, device)  # (N, J, 3) canonical, pelvis-centred
    b_idx = [s.index for s in samples]
    a_idx = [s.source_index for s in samples]
    gt, copy_a = torch.as_tensor(d.joints[b_idx]), torch.as_tensor(d.joints[a_idx])
    res.update({"pose_edit/mpjpe_mm": mpjpe_mm(pred, gt).mean().item(),
                "pose_edit/pa_mpjpe_mm": pa_mpjpe_mm(pred, gt).mean().item(),
                "pose_edit/copy_a_mpjpe_mm": mpjpe_mm(copy_a, gt).mean().item(),
                "pose_edit/copy_a_pa_mpjpe_mm": pa_mpjpe_mm(copy_a, gt).mean().item(),
                "pose_edit/posecode_truth": posecode_truth(
                    [posecodes.stated_codes(s.text, "edit") for s in samples],
                    posecodes.posecodes(pred.double().numpy()), posecodes.CODE_NAMES)})
    true_b = torch.as_tensor(np.stack([s.pose6d for s in samples])).reshape(len(samples), -1).to(device)
    pose_a = torch.as_tensor(np.stack([s.pose_input for s in samples])).reshape(len(samples), -1).to(device)
    for name, r in retrievers.items():
        target = r.embed_pose(true_b)
        for what, query in (("", pose6d.to(device)), ("copy_a_", pose_a)):
            rec = pose_recall_at_k((r.embed_pose(query) @ target.T).float().cpu(), EDIT_RECALL_KS)
            res.update({f"pose_edit/{name}_retriever/{what}R@{k}": v for k, v in rec.items()})
    preds = {"pose_edit": {"index": torch.tensor(b_idx), "source": torch.tensor(a_idx), "pose6d": pose6d},
             "answers": {"pose_to_text": texts}}
    return res, preds


@torch.no_grad()
def evaluate_real(policy, tokenizer, image_sets: dict, text_set=None, bodymodel=None, regressor=None, device="cpu",
                  retrievers: dict | None = None, max_samples: int = 0, batch_size: int = 64,
                  sample_pose: bool = False, seed: int = 0, pose_temperature: float = 1.0):
    """Runs a policy on real test sets (metric names: the module docstring), sharded and gathered as
    `evaluate_policy`; the pose is the head's mean (or a seeded sample) at the teacher-forced `<POSE>`.

    Args:
        policy, tokenizer: as `evaluate_policy`.
        image_sets: {NAME: realdata.HMR2ImageDataset} cropped at the CLIP tower's input size (3DPW, H36M).
        text_set: realdata.PoseScript(root, amass, "test", captions=("human",)) (PoseScript-H2), or None.
        bodymodel: body.BodyModel on `device` (SMPL, posed with the mean shape). regressor: (17 or 19, V)
            `realdata.load_joint_regressor`, V = bodymodel.num_vertices. Both unused without image_sets.
        retrievers: {name: TextPoseRetriever} for the text set's Recall@K (none: no recall fields).
        max_samples: the first N samples of each set (<= 0: all). batch_size, sample_pose, seed,
            pose_temperature: as `evaluate_policy`.
    Returns:
        (metrics {name: float, None for the random protocol when N < 32}, predictions
        {"image_to_pose/NAME" or "text_to_pose/PoseScript-H2": {"index": (N,), "pose6d": (N, P)}}).
    """
    rank, world = plumbing.rank_and_world()
    was_training = policy.training
    policy.eval()

    def predict(ds) -> torch.Tensor:  # (N, P), this rank's samples read one batch at a time, then gathered
        local = list(range(len(ds) if max_samples <= 0 else min(max_samples, len(ds))))[rank::world]
        out = [evaluate.predict_poses(policy, tokenizer, [ds.sample(i) for i in local[j:j + batch_size]], device,
                                      batch_size, sample_pose, seed, pose_temperature)
               for j in range(0, len(local), batch_size)]
        return plumbing.gather_shards(torch.cat([torch.zeros(0, model.POSE_DIM), *out]), world)

    res, preds = {}, {}
    for name, ds in image_sets.items():
        pose6d = predict(ds)  # (N, P)
        pred = torch.cat([realdata.lsp14_from_vertices(bodymodel.forward_rot6d(pose6d[i:i + 256].to(device)).vertices,
                                                       regressor).cpu()
                          for i in range(0, len(pose6d), 256)])  # (N, 14, 3) m, minus the regressor's pelvis
        gt = torch.as_tensor(ds.gt_lsp14()[:len(pose6d)])  # (N, 14, 3) m, pelvis-relative
        res[f"image_to_pose/{name}/mpjpe_mm"] = realdata.lsp14_mpjpe_mm(pred, gt).mean().item()
        res[f"image_to_pose/{name}/pa_mpjpe_mm"] = pa_mpjpe_mm(pred, gt).mean().item()
        preds[f"image_to_pose/{name}"] = {"index": torch.arange(len(pose6d)), "pose6d": pose6d}
    if text_set is not None:
        pose6d = predict(text_set)
        if retrievers:
            text_emb = evaluate.embed_captions(retrievers, [text_set.captions[i][0] for i in range(len(pose6d))],
                                               device)
            for name, retriever in retrievers.items():  # text_to_pose/... -> text_to_pose/PoseScript-H2/...
                res.update({k.replace("/", "/PoseScript-H2/", 1): v for k, v in
                            evaluate.retrieval_metrics(name, retriever, text_emb[name], pose6d, device).items()})
        preds["text_to_pose/PoseScript-H2"] = {"index": torch.arange(len(pose6d)), "pose6d": pose6d}
    policy.train(was_training)
    return res, preds

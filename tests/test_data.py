"""data.py: the task mixture and its targets, the templates, the word-level tokenizer (round
trip on every benchmark text), collate (image-token expansion, labels, <POSE> position,
left-padded prompts) and bad input."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import body
import data
import plumbing
import posebench
import vocab

TINY = posebench.BenchConfig(n_train=48, n_val=16, n_test=40, image_size=32)


@pytest.fixture(scope="module")
def ds():
    return data.PoseBenchTasks("train", TINY, length=600, seed=0)


@pytest.fixture(scope="module")
def tok():
    return vocab.tiny_tokenizer(TINY)


@pytest.fixture(scope="module")
def mixed(ds):
    """Two samples of each task, in an interleaved order."""
    by_task = {t: [s for s in (ds[i] for i in range(60)) if s.task == t][:2] for t in data.TASKS}
    return [by_task[t][k] for k in range(2) for t in data.TASKS]


def slow_pose6d(aa: np.ndarray) -> np.ndarray:
    """(24, 3) axis-angle -> (24, 6), one joint at a time."""
    return np.stack([body.matrix_to_rot6d(body.axis_angle_to_matrix(torch.as_tensor(a))).numpy() for a in aa])


def same_sample(a: data.Sample, b: data.Sample) -> bool:
    arrays = all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
                 for x, y in ((a.image, b.image), (a.pose6d, b.pose6d), (a.joints, b.joints)))
    return arrays and (a.task, a.prompt, a.answer, a.index) == (b.task, b.prompt, b.answer, b.index)


# ---- The mixture and its targets --------------------------------------------------------------

def test_mixture_is_deterministic(ds):
    again = data.PoseBenchTasks("train", TINY, length=600, seed=0)
    shorter = data.PoseBenchTasks("train", TINY, length=20, seed=0)
    other = data.PoseBenchTasks("train", TINY, length=600, seed=1)
    assert all(same_sample(ds[i], again[i]) and same_sample(ds[i], shorter[i]) for i in range(20))
    assert not all(same_sample(ds[i], other[i]) for i in range(20))
    assert same_sample(ds[-1], ds[599])
    assert len(data.PoseBenchTasks("val", TINY)) == TINY.n_val  # default length: poses in the split


def test_mixture_follows_mix(ds):
    tasks = [ds[i].task for i in range(len(ds))]
    frac = np.array([tasks.count(t) for t in data.TASKS]) / len(tasks)
    assert np.abs(frac - np.array([0.4, 0.4, 0.2])).max() < 0.07, frac
    only_text = data.PoseBenchTasks("train", TINY, mix=(0, 1, 0), length=50)
    assert {s.task for s in only_text} == {"text_to_pose"}
    only_vqa = data.PoseBenchTasks("train", TINY, tasks=("vqa",), mix=(1.0,), length=50)
    assert {s.task for s in only_vqa} == {"vqa"}
    indices = {ds[i].index for i in range(len(ds))}
    assert len(indices) > 0.9 * TINY.n_train  # poses drawn over the whole split


def test_fixed_pool_and_fresh_draws():
    """docs/RESULTS.md 'Data coverage': indices drawn from range(N) (the default length) can reach only about
    1 - 1/e of the poses of a task; the training scripts' --fresh_samples length reaches them all."""
    N = TINY.n_train
    pool = data.PoseBenchTasks("train", TINY, mix=(0, 1, 0))
    reach = len({pool[i].index for i in range(N)}) / N
    assert 0.5 < reach < 0.75  # 1 - 1/e = 0.63
    fresh = data.PoseBenchTasks("train", TINY, mix=(0, 1, 0), length=data.FRESH_DRAWS)
    rng = np.random.default_rng(0)
    assert len({fresh[int(i)].index for i in rng.integers(data.FRESH_DRAWS, size=20 * N)}) == N


def test_targets_are_in_the_task_frame(ds):
    d = posebench.load_split("train", TINY)
    seen = set()
    for i in range(80):
        s = ds[i]
        k = s.index
        seen.add(s.task)
        if s.task == "image_to_pose":
            view = np.concatenate([d.global_orient_view[k][None], d.pose_aa[k, 1:]])
            np.testing.assert_allclose(s.pose6d, slow_pose6d(view), atol=1e-6)
            np.testing.assert_array_equal(s.joints, d.joints_view[k])
            np.testing.assert_array_equal(s.image, d.images[k])
            assert s.prompt in data.PROMPTS["image_to_pose"] and s.answer == data.POSE_ANSWER
        elif s.task == "text_to_pose":
            np.testing.assert_allclose(s.pose6d, slow_pose6d(d.pose_aa[k]), atol=1e-6)
            np.testing.assert_array_equal(s.joints, d.joints[k])
            assert s.image is None and s.answer == data.POSE_ANSWER
            assert any(p.replace("{caption}", c) == s.prompt
                       for p in data.PROMPTS["text_to_pose"] for c in d.captions[k])
        else:
            assert s.pose6d is None and s.joints is None
            np.testing.assert_array_equal(s.image, d.images[k])
            assert any(s.prompt == "<image>\n" + qa["question"] and s.answer == qa["answer"] for qa in d.vqa[k])
        assert s.pose6d is None or (s.pose6d.shape, s.pose6d.dtype) == ((24, 6), np.float32)
        assert s.image is None or (s.image.shape, s.image.dtype) == ((32, 32, 3), np.uint8)
    assert seen == set(data.TASKS)
    # The two frames differ only in the root.
    np.testing.assert_allclose(ds.pose6d_view[:, 1:], ds.pose6d[:, 1:])
    assert not np.allclose(ds.pose6d_view[:, 0], ds.pose6d[:, 0])


def test_eval_samples(ds):
    d = posebench.load_split("train", TINY)
    for task in data.TASKS:
        ev = ds.eval_samples(task)
        assert [s.index for s in ev] == list(range(TINY.n_train)) and {s.task for s in ev} == {task}
        assert all(same_sample(a, b) for a, b in zip(ev, ds.eval_samples(task)))
    assert ds.eval_samples("text_to_pose")[3].prompt == data.PROMPTS["text_to_pose"][0].replace(
        "{caption}", d.captions[3][0])
    assert ds.eval_samples("vqa")[3].answer == d.vqa[3][0]["answer"]
    assert ds.eval_samples("image_to_pose")[3].prompt == data.PROMPTS["image_to_pose"][0]


# ---- Templates --------------------------------------------------------------------------------

def test_templates():
    for p in data.PROMPTS["image_to_pose"] + data.PROMPTS["vqa"]:
        assert p.count(data.IMAGE_TOKEN) == 1 and p.startswith(data.IMAGE_TOKEN)
    for p in data.PROMPTS["text_to_pose"]:
        assert p.count("{caption}") == 1 and data.IMAGE_TOKEN not in p
    assert data.chat_text("Hi?", None) == "USER: Hi? ASSISTANT:"
    assert data.chat_text("Hi?", "Yes.") == "USER: Hi? ASSISTANT: Yes."


def test_pose_answer_pattern(tok):
    pat = data.POSE_ANSWER_PATTERN
    decoded = tok.decode(tok(data.POSE_ANSWER, add_special_tokens=False)["input_ids"])  # keeps <POSE>
    for ok in (data.POSE_ANSWER, " The SMPL pose of this person is <POSE> . ",
               "The  SMPL pose of this\nperson is<POSE>.", decoded):
        assert pat.fullmatch(ok) and pat.match(ok), ok
    for bad in ("The SMPL pose of this person is .", "The SMPL pose of this person is <POSE>. Yes.",
                "TheSMPL pose of this person is <POSE>.", "the SMPL pose of this person is <POSE>.",
                "The SMPL pose of this person is <POSE>", "Yes. The SMPL pose of this person is <POSE>."):
        assert not pat.match(bad), bad


def test_normalize_text():
    assert data.normalize_text("Yes, the arm is bent.") == data.normalize_text("Yes , the arm  is\nbent .") \
        == "Yes , the arm is bent ."
    assert data.normalize_text("<image>\nIs it?") == "<image> Is it ?"
    assert data.normalize_text("the arm is bent.") != data.normalize_text("the arm is straight.")
    assert data.normalize_text("The arm") != data.normalize_text("the arm")  # case matters


# ---- Tokenizer --------------------------------------------------------------------------------

def test_tokenizer_round_trip(tok):
    texts = vocab.benchmark_texts(TINY)
    d = posebench.load_split("test", TINY)
    assert data.POSE_ANSWER in texts and d.vqa[0][0]["answer"] in texts
    assert data.PROMPTS["text_to_pose"][1].replace("{caption}", d.captions[0][2]) in texts
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in x for x in ids)
    for x, text in zip(ids, texts):
        assert data.normalize_text(tok.decode(x)) == data.normalize_text(text), text


def test_tokenizer_specials(tok):
    assert [tok.convert_tokens_to_ids(t) for t in vocab.SPECIAL_TOKENS] == list(range(6))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.image_token_id, tok.pose_token_id) == (4, 5)
    assert tok("is<POSE>.", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["is", "<POSE>", "."])
    x = tok("<image><image>\nThe SMPL pose of this person is <POSE>.", add_special_tokens=False)["input_ids"]
    assert x[:2] == [4, 4] and x.count(5) == 1 and len(x) == 2 + 9  # no bos/eos added by the tokenizer
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_tiny_tokenizer_is_cached_and_deterministic(tok):
    path = os.path.join(plumbing.cache_dir(), "tokenizers", posebench.config_key(TINY), "tokenizer.json")
    assert os.path.exists(path)
    mtime = os.stat(path).st_mtime_ns
    assert vocab.tiny_tokenizer(TINY).get_vocab() == tok.get_vocab() and os.stat(path).st_mtime_ns == mtime
    texts = vocab.benchmark_texts(TINY)
    assert vocab.build_tokenizer(texts[::-1]).get_vocab() == tok.get_vocab()


# ---- Collate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_img", [1, 7, 16])
def test_collate_expands_image_tokens(mixed, tok, n_img):
    batch = data.collate(mixed, tok, num_image_tokens=n_img)
    counts = (batch.input_ids == tok.image_token_id).sum(1).tolist()
    assert counts == [n_img if s.image is not None else 0 for s in mixed]
    # The expansion is the tokenizer's own encoding of the expanded chat text.
    for b, s in enumerate(mixed):
        row = batch.input_ids[b, batch.attention_mask[b].bool()].tolist()
        text = data.chat_text(s.prompt.replace("<image>", "<image>" * n_img), s.answer)
        assert row == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_collate_labels_cover_the_answer_and_eos(mixed, tok):
    batch = data.collate(mixed, tok, num_image_tokens=4)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for b, s in enumerate(mixed):
        sup = batch.labels[b] != -100
        labelled = batch.labels[b, sup].tolist()
        assert labelled == batch.input_ids[b, sup].tolist()
        assert labelled[-1] == tok.eos_token_id
        assert data.normalize_text(tok.decode(labelled[:-1])) == data.normalize_text(s.answer)
        pos = sup.nonzero().flatten()
        assert (pos == torch.arange(pos[0], pos[0] + len(pos))).all()  # one contiguous span
        prompt = tok.decode(batch.input_ids[b, :pos[0]])
        assert data.normalize_text(prompt).endswith("ASSISTANT :") and prompt.startswith("<s> USER")
        L = int(batch.attention_mask[b].sum())
        assert pos[-1] == L - 1 and batch.attention_mask[b, :L].all()  # right padding
        assert (batch.input_ids[b, L:] == tok.pad_token_id).all() and (batch.labels[b, L:] == -100).all()


def test_collate_pose_fields(mixed, tok):
    batch = data.collate(mixed, tok, num_image_tokens=3)
    B = len(mixed)
    assert batch.pose6d.shape == (B, 24, 6) and batch.joints.shape == (B, 24, 3)
    assert batch.tasks == [s.task for s in mixed]
    for b, s in enumerate(mixed):
        if s.task in data.POSE_TASKS:
            assert batch.input_ids[b, batch.pose_token_pos[b]] == tok.pose_token_id and batch.pose_valid[b]
            assert batch.labels[b, batch.pose_token_pos[b]] == tok.pose_token_id
            torch.testing.assert_close(batch.pose6d[b], torch.from_numpy(s.pose6d))
            torch.testing.assert_close(batch.joints[b], torch.from_numpy(s.joints))
        else:
            assert batch.pose_token_pos[b] == -1 and not batch.pose_valid[b]
            assert (batch.pose6d[b] == 0).all() and (batch.joints[b] == 0).all()


def test_collate_pixel_values(mixed, tok):
    batch = data.collate(mixed, tok, num_image_tokens=2)
    images = [s.image for s in mixed if s.image is not None]
    assert batch.pixel_values.shape == (len(images), 3, 32, 32) and batch.pixel_values.dtype == torch.float32
    want = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(batch.pixel_values, want)
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    text_only = [s for s in mixed if s.image is None]
    assert data.collate(text_only, tok, num_image_tokens=2).pixel_values is None
    moved = batch.to("cpu")
    assert moved.tasks == batch.tasks and torch.equal(moved.input_ids, batch.input_ids)


def test_collate_prompt_only_left_padded_is_a_prefix(mixed, tok):
    full = data.collate(mixed, tok, num_image_tokens=5)
    gen = data.collate(mixed, tok, num_image_tokens=5, add_answer=False, pad_side="left")
    assert (gen.labels == -100).all() and (gen.pose_token_pos == -1).all()
    assert (gen.attention_mask[:, -1] == 1).all()
    assert (gen.attention_mask.sum(1) < gen.input_ids.shape[1]).any()  # some row is padded
    for b in range(len(mixed)):
        m = gen.attention_mask[b]
        n_pad = int((m == 0).sum())
        assert (m[:n_pad] == 0).all() and (m[n_pad:] == 1).all()  # pads on the left only
        assert (gen.input_ids[b, :n_pad] == tok.pad_token_id).all()
        prompt = gen.input_ids[b, n_pad:]
        answer_start = int((full.labels[b] != -100).nonzero()[0])
        assert torch.equal(prompt, full.input_ids[b, :answer_start])  # ids before the answer
    torch.testing.assert_close(gen.pixel_values, full.pixel_values)


def llama_style_tokenizer(texts, scheme: str):
    """A subword (BPE) tokenizer in LLaMA's form, trained here on `texts`: SentencePiece-style pieces
    ("▁" marks a word start; merges stay within words), LLaVA's special tokens (<POSE> is
    build_llava_7b's to add). scheme "legacy": the normalizer of llava-hf's tokenizer.json (prepend
    "▁", spaces to "▁": a text starting with a space gets "▁▁"); "first": transformers 5's LlamaTokenizer
    (a Metaspace pre-tokenizer that prepends "▁" to the first piece only)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                                       "<image>", "<pad>"]))
    if scheme == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


@pytest.mark.parametrize("scheme", ["legacy", "first"])
def test_collate_with_a_subword_tokenizer_labels_exactly_the_answer(mixed, scheme):
    """With LLaVA's kind of tokenizer, the supervised ids are exactly the ids the answer has in the
    whole conversation's encoding (what the model reads after the prompt, and must generate), and the
    prompt-only encoding is their prefix."""
    texts = [data.chat_text(s.prompt, s.answer) for s in mixed] + [t for ps in data.PROMPTS.values() for t in ps]
    tok = llama_style_tokenizer(texts, scheme)
    tok.add_special_tokens({"additional_special_tokens": ["<POSE>"]})  # as build_llava_7b adds it
    pieces = tok.tokenize(data.chat_text(mixed[0].prompt, None))
    # subwords
    assert any(len(p) > 3 for p in pieces) and len(pieces) > len(data.chat_text(mixed[0].prompt, None).split())
    n_img = 3
    batch = data.collate(mixed, tok, num_image_tokens=n_img)
    gen = data.collate(mixed, tok, num_image_tokens=n_img, add_answer=False, pad_side="left")
    for b, s in enumerate(mixed):
        prompt = s.prompt.replace("<image>", "<image>" * n_img)
        whole = tok(data.chat_text(prompt, s.answer), add_special_tokens=False)["input_ids"]
        alone = tok(data.chat_text(prompt, None), add_special_tokens=False)["input_ids"]
        assert whole[:len(alone)] == alone  # the tokenizer keeps the prompt's ids when the answer follows
        sup = batch.labels[b] != -100
        assert batch.labels[b, sup].tolist() == whole[len(alone):] + [tok.eos_token_id]
        row = batch.input_ids[b, batch.attention_mask[b].bool()].tolist()
        assert row == [tok.bos_token_id] + whole + [tok.eos_token_id]
        answer = tok.decode(batch.labels[b, sup].tolist()[:-1])
        assert data.normalize_text(answer) == data.normalize_text(s.answer)
        prompt_ids = gen.input_ids[b, gen.attention_mask[b].bool()].tolist()
        assert prompt_ids == [tok.bos_token_id] + alone
        if s.task in data.POSE_TASKS:
            assert batch.input_ids[b, batch.pose_token_pos[b]] == tok.convert_tokens_to_ids("<POSE>")


# ---- Bad input --------------------------------------------------------------------------------

def test_collate_max_length_cuts_long_answers(mixed, tok):
    """max_length cuts an answer (its eos too, as LLaVA does) and never the prompt; a cut that would
    drop <POSE>, or a prompt with no room left, is an error."""
    vqa = next(s for s in mixed if s.task == "vqa")
    long = dataclasses.replace(vqa, answer=vqa.answer + " and" * 300)
    full = data.collate([long, vqa], tok, 4)
    L = int(full.attention_mask[1].sum()) + 5  # the short sample fits, the long one is cut
    cut = data.collate([long, vqa], tok, 4, max_length=L)
    assert cut.input_ids.shape[1] == L and torch.equal(cut.input_ids[0], full.input_ids[0, :L])
    assert torch.equal(cut.input_ids[1, :L - 5], full.input_ids[1, :L - 5])
    pose = next(s for s in mixed if s.task == "text_to_pose")
    n_prompt = int((data.collate([pose], tok, 4).labels[0] == -100).sum())
    with pytest.raises(ValueError, match="cuts its answer before <POSE>"):
        data.collate([pose], tok, 4, max_length=n_prompt + 1)
    with pytest.raises(ValueError, match="leaving no room for an answer"):
        data.collate([pose], tok, 4, max_length=5)


def test_bad_input(mixed, tok):
    img = next(s for s in mixed if s.task == "image_to_pose")
    txt = next(s for s in mixed if s.task == "text_to_pose")
    cases = [
        ([data.Sample("image_to_pose", "What pose?", data.POSE_ANSWER, image=img.image, pose6d=img.pose6d)],
         "has an image but its prompt holds 0 <image>"),
        ([data.Sample("text_to_pose", "<image>\n" + txt.prompt, data.POSE_ANSWER, pose6d=txt.pose6d)],
         "has no image but its prompt holds <image>"),
        ([data.Sample("text_to_pose", txt.prompt, "The SMPL pose is unknown.", pose6d=txt.pose6d)],
         "answer must hold <POSE> exactly once"),
        ([img, data.Sample("vqa", "<image>\nIs it?", "Yes.", image=np.zeros((16, 16, 3), np.uint8))],
         "must share one size"),
        ([data.Sample("text_to_pose", txt.prompt + " <POSE>", data.POSE_ANSWER)], "the prompt holds <POSE>"),
    ]
    for samples, match in cases:
        with pytest.raises(ValueError, match=match):
            data.collate(samples, tok, num_image_tokens=2)
    with pytest.raises(ValueError, match="pad_side"):
        data.collate([img], tok, num_image_tokens=2, pad_side="middle")
    with pytest.raises(ValueError, match="unknown task 'pose_to_image'"):
        data.PoseBenchTasks("train", TINY, tasks=("text_to_pose", "pose_to_image"), mix=(0.5, 0.5))
    with pytest.raises(ValueError, match="one weight per task"):
        data.PoseBenchTasks("train", TINY, mix=(0.5, 0.5))
    with pytest.raises(ValueError, match="one weight per task"):
        data.PoseBenchTasks("train", TINY, tasks=("vqa",))  # the default mix has three weights
    with pytest.raises(ValueError, match="non-negative"):
        data.PoseBenchTasks("train", TINY, mix=(0.5, 0.7, -0.2))
    with pytest.raises(ValueError, match="unknown split"):
        data.PoseBenchTasks("dev", TINY)
    ds = data.PoseBenchTasks("train", TINY, length=3)
    with pytest.raises(IndexError):
        ds[3]

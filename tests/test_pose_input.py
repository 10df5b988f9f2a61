"""Pose as input: the pose encoder's tokens at the input-pose placeholder (shapes, the
right positions, a changed pose changes the <POSE> state, gradients, generation), a prompt without
a pose unchanged bit for bit, the extended tokenizer, the editing pairs and their instructions, the
pose-to-text and editing samples, and collate."""
import numpy as np
import pytest
import torch
import transformers

import data
import model
import posebench
import posecodes
import presets
import vocab
from test_model import force_pose

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40, image_size=32)


@pytest.fixture(scope="module")
def tok():
    return vocab.tiny_tokenizer(CFG, pose_input=True)


@pytest.fixture(scope="module")
def ds():
    return data.PoseBenchTasks("train", CFG, tasks=data.ALL_TASKS, mix=(1, 1, 1, 1, 1), length=400, seed=0)


def tiny(tok, seed=0, **overrides):
    cfg = presets.build_config(transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                        bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **presets.TINY["lm"]),
                               tok, image_size=32)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return model.PoseLlavaForConditionalGeneration(cfg).eval()


def by_task(ds, task, n):
    out = [s for s in (ds[i] for i in range(len(ds))) if s.task == task][:n]
    assert len(out) == n
    return out


def embeds_seen(m, b, pose_values):
    """The input embeddings the language model receives (a forward pre-hook)."""
    seen = {}

    def grab(mod, args, kw):
        seen["x"] = kw["inputs_embeds"].detach().clone()

    hook = m.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos, pose_values=pose_values)
    finally:
        hook.remove()
    return seen["x"]


# ---- The pose encoder in the model ----------------------------------------------------------------

def test_encoder_shapes_and_placeholders_filled_in_order(tok, ds):
    m = tiny(tok)
    assert m.config.pose_input_tokens == data.POSE_INPUT_LEN and m.config.pose_input_token_id == tok.pose_input_token_id
    enc = model.PoseInputEncoder(model.POSE_DIM, 32, 3)
    assert enc(torch.randn(5, 24, 6)).shape == (5, 3, 32)
    with pytest.raises(ValueError, match="144"):
        enc(torch.randn(5, 23, 6))
    samples = [by_task(ds, "pose_to_text", 1)[0], by_task(ds, "image_to_pose", 1)[0], by_task(ds, "pose_edit", 1)[0],
               by_task(ds, "vqa", 1)[0]]
    b = data.collate(samples, tok, m.num_image_tokens)
    assert b.pose_values.shape == (2, 24, 6)
    assert torch.equal(b.pose_values[1], torch.as_tensor(samples[2].pose_input))
    x = embeds_seen(m, b, b.pose_values)
    feats = m.model.pose_input_features(b.pose_values)  # (2, L, D)
    assert feats.shape == (2, data.POSE_INPUT_LEN, m.config.text_config.hidden_size)
    slow_rows = []
    for r in range(len(samples)):  # slow: walk each row's tokens, one placeholder at a time
        for t in range(b.input_ids.shape[1]):
            if b.input_ids[r, t] == tok.pose_input_token_id:
                slow_rows.append(x[r, t])
            elif b.input_ids[r, t] not in (tok.image_token_id,):
                assert torch.equal(x[r, t], m.get_input_embeddings()(b.input_ids[r, t]))
    assert torch.allclose(torch.stack(slow_rows), feats.reshape(-1, feats.shape[-1]), atol=1e-6)
    image = torch.cat(m.model.get_image_features(pixel_values=b.pixel_values).pooler_output)
    assert torch.allclose(x[b.input_ids == tok.image_token_id], image, atol=1e-6)


def test_changed_pose_changes_the_pose_state_and_gradients_reach_the_encoder(tok, ds):
    m = tiny(tok)
    s = by_task(ds, "pose_edit", 2)
    b = data.collate(s, tok, m.num_image_tokens)
    _, dist, h = m.forward_hybrid(b.input_ids, b.attention_mask, None, b.pose_token_pos, pose_values=b.pose_values)
    _, _, h2 = m.forward_hybrid(b.input_ids, b.attention_mask, None, b.pose_token_pos,
                                pose_values=b.pose_values.flip(0))  # the two rows swap input poses
    assert not torch.allclose(h, h2) and (h[0] - h2[0]).abs().max() > 1e-4
    dist.mean.sum().backward()
    for mod in (m.model.pose_input_encoder, m.model.pose_input_projector):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
    with pytest.raises(ValueError, match="placeholders"):
        m.forward_hybrid(b.input_ids, b.attention_mask, None, b.pose_token_pos, pose_values=b.pose_values[:1])


def test_prompt_without_pose_is_unchanged_bit_for_bit(tok, ds):
    """Pose input built or not (same seed): every other weight, the forward of a batch without an input
    pose and the RNG state after construction are identical."""
    torch.manual_seed(0)
    with_pi = tiny(tok, seed=3)
    after_with = torch.rand(3)
    without = tiny(tok, seed=3, pose_input_tokens=0)
    after_without = torch.rand(3)
    assert torch.equal(after_with, after_without)
    sd, sd0 = with_pi.state_dict(), without.state_dict()
    extra = {k for k in sd if k.startswith(("model.pose_input_encoder.", "model.pose_input_projector."))}
    assert extra and set(sd) - extra == set(sd0)
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
    samples = [ds[i] for i in range(40) if ds[i].task in data.TASKS][:6]
    b = data.collate(samples, tok, with_pi.num_image_tokens)
    assert b.pose_values is None
    out = with_pi.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    out0 = without.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert torch.equal(out[0], out0[0]) and torch.equal(out[2], out0[2])
    assert presets.trained_modules(without.config) == model.MODULES_TO_SAVE
    assert presets.trained_modules(with_pi.config) == model.MODULES_TO_SAVE + model.POSE_INPUT_MODULES
    with pytest.raises(ValueError, match="without pose input"):
        without.model.pose_input_features(torch.zeros(1, 24, 6))


def test_generate_reads_the_pose_in_the_prefill_only(tok, ds):
    """Each generated step's logits equal the teacher-forced forward's over prompt + the tokens so far."""
    m = tiny(tok)
    s = by_task(ds, "pose_to_text", 2) + by_task(ds, "text_to_pose", 1) + by_task(ds, "pose_edit", 1)
    p = data.collate(s, tok, m.num_image_tokens, add_answer=False, pad_side="left")
    out = m.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pose_values=p.pose_values,
                     max_new_tokens=3,
                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=True,
                     return_dict_in_generate=True)
    T = p.input_ids.shape[1]
    full = out.sequences
    mask = torch.cat([p.attention_mask, torch.ones(len(s), full.shape[1] - T, dtype=torch.long)], 1)
    logits, _, _ = m.forward_hybrid(full, mask, None, None, pose_values=p.pose_values)
    for k in range(full.shape[1] - T):
        assert torch.allclose(out.logits[k], logits[:, T - 1 + k], atol=1e-4)
    assert not (full[:, T:] == tok.pose_input_token_id).any()
    other = m.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pose_values=p.pose_values.flip(0),
                       max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id, output_logits=True,
                       return_dict_in_generate=True)
    assert not torch.allclose(other.logits[0][0], out.logits[0][0])


def pose_prompts(ds, tok, n_img, group=1):
    """Left-padded prompts with input poses (pose_to_text, pose_edit) beside an image one, each `group` times."""
    s = by_task(ds, "pose_to_text", 2) + by_task(ds, "image_to_pose", 1) + by_task(ds, "pose_edit", 1)
    return data.collate([x for x in s for _ in range(group)], tok, n_img, add_answer=False, pad_side="left")


def test_sample_reads_the_pose_as_generate_and_teacher_forcing_do(tok, ds):
    """model.sample with input poses: greedy answers equal transformers' generate with them, the <POSE> state
    read on the way equals the teacher-forced one, and other input poses give other states."""
    m = tiny(tok, seed=2)
    p = pose_prompts(ds, tok, m.num_image_tokens)
    T = p.input_ids.shape[1]
    ref = m.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values,
                     pose_values=p.pose_values, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id)
    out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                       temperature=0, pose_values=p.pose_values)
    assert torch.equal(out.sequences, ref)
    force = force_pose(3, m.config.pose_token_id)
    out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 5, tok.eos_token_id, tok.pad_token_id,
                       logits_processor=force, pose_values=p.pose_values)
    assert out.has_pose.all() and (out.pose_pos == T + 3).all()
    mask = torch.cat([p.attention_mask, torch.ones(len(out.states), out.sequences.shape[1] - T, dtype=torch.long)], 1)
    _, _, tf_state = m.forward_hybrid(out.sequences, mask, p.pixel_values, out.pose_pos, pose_values=p.pose_values)
    assert torch.allclose(out.states, tf_state, atol=1e-5, rtol=1e-5)
    other = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 5, tok.eos_token_id, tok.pad_token_id,
                         logits_processor=force, pose_values=p.pose_values.flip(0))
    posed = (p.input_ids == tok.pose_input_token_id).any(1)
    assert not torch.allclose(other.states[posed], out.states[posed])


def test_grouped_forward_with_input_poses_equals_the_full_one(tok, ds):
    """B prompts (with input poses, and an image) x G answers: the prompts read once with their poses give
    forward_hybrid's answer logits, <POSE> states and gradients (float rounding apart), and greedy
    answers equal to ungrouped ones."""
    m = tiny(tok, seed=3)
    G = 3
    p = pose_prompts(ds, tok, m.num_image_tokens, G)
    T = p.input_ids.shape[1]
    torch.manual_seed(0)
    out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                       [tok.pad_token_id], group=G, logits_processor=force_pose(2, m.config.pose_token_id),
                       pose_values=p.pose_values)  # padding suppressed, as in a rollout: the mask below finds it
    greedy = [model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                           temperature=0, group=g, pose_values=p.pose_values).sequences for g in (1, G)]
    assert torch.equal(greedy[0], greedy[1])
    mask = torch.cat([p.attention_mask, (out.sequences[:, T:] != tok.pad_token_id).long()], 1)
    results = []
    for grouped in (False, True):
        m.zero_grad()
        if grouped:
            logits, dist, state = model.forward_grouped(m, out.sequences, mask, p.pixel_values, T, G, out.pose_pos,
                                                        p.pose_values)
        else:
            logits, dist, state = m.forward_hybrid(out.sequences, mask, p.pixel_values, out.pose_pos,
                                                   pose_values=p.pose_values)
            logits = logits[:, T - 1:-1]
        (logits.logsumexp(-1)[mask[:, T:].bool()].sum() + dist.mean[out.has_pose].sum()).backward()
        results.append((logits, state, {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}))
    (l0, s0, g0), (l1, s1, g1) = results
    valid, has = mask[:, T:].bool(), out.has_pose
    assert has.sum() >= 8 and torch.allclose(l0[valid], l1[valid], atol=1e-5)
    assert torch.allclose(s0[has], s1[has], atol=1e-5) and torch.allclose(s1[has], out.states[has], atol=1e-5)
    assert g0.keys() == g1.keys() and any(n.startswith("model.pose_input_encoder") for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-4, rtol=1e-4), n


# ---- Tokenizer, pairs, samples, collate -------------------------------------------------------------

def test_extended_tokenizer_keeps_every_default_id(tok):
    base = vocab.tiny_tokenizer(CFG)
    assert all(tok.get_vocab()[w] == i for w, i in base.get_vocab().items())
    assert tok.pose_input_token_id == len(base) and len(tok) > len(base) + 1
    assert data.POSE_INPUT_TOKEN not in base.get_vocab()
    ids = tok(vocab.pose_input_texts(CFG, ("val",)), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in sum(ids, [])
    assert tok("Describe this pose: <pose_input>",
               add_special_tokens=False)["input_ids"].count(tok.pose_input_token_id) == 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_edit_pairs_and_instructions_are_consistent(split):
    d = posebench.load_split(split, CFG)
    e = posebench.load_edits(split, CFG)
    assert len(e) > 0 and len(set(e.source.tolist())) == len(e)
    for a, b, codes, texts in zip(e.source, e.target, e.codes, e.instructions):
        assert a != b and d.archetype[a] == d.archetype[b]
        assert 1 <= len(codes) <= posecodes.EDIT_MAX_CODES
        col = [posecodes.CODE_NAMES.index(c) for c in codes]
        assert not d.codes[a, col].any() and d.codes[b, col].all()  # every named posecode: false of A, true of B
        assert set(codes) == {posecodes.CODE_NAMES[c] for c in np.flatnonzero(d.codes[b] & ~d.codes[a])}
        for t in texts:
            assert sorted(posecodes.stated_codes(t, "edit")) == sorted(codes) and t.endswith(".") and t[0].isupper()
    # B is the nearest candidate (slow reference: every pose of the split)
    for a, b in zip(e.source[:10], e.target[:10]):
        gained = (d.codes & ~d.codes[a]).sum(1)
        cand = [j for j in range(len(d)) if j != a and d.archetype[j] == d.archetype[a] and 1 <= gained[j] <= 4]
        dist = [np.linalg.norm(d.joints[j] - d.joints[a], axis=-1).mean() for j in cand]
        assert cand[int(np.argmin(dist))] == b
    again = posebench.make_edits(d, CFG.captions_per_pose, CFG.seed)
    assert np.array_equal(again.source, e.source) and again.instructions == e.instructions


def test_every_caption_parses_to_its_posecodes():
    d = posebench.load_split("val", CFG)
    for caps, used in zip(d.captions, d.caption_codes):
        for c, u in zip(caps, used):
            assert sorted(posecodes.stated_codes(c)) == sorted(u)
    assert posecodes.stated_codes("The left hand is raised over the head and the left hand is raised.") == [
        "left_hand_above_head", "left_hand_raised"]  # the longer phrase first, each code once
    assert posecodes.stated_codes("Nothing to see here.") == []


def test_pose_input_samples(ds):
    d = ds.data
    for s in by_task(ds, "pose_to_text", 3):
        assert s.answer in d.captions[s.index] and s.text == s.answer and s.pose6d is None
        assert np.allclose(s.pose_input, ds.pose6d[s.index]) and data.POSE_INPUT_TOKEN in s.prompt
    for s in by_task(ds, "pose_edit", 3):
        k = int(np.flatnonzero(ds.edits.source == s.source_index)[0])
        assert s.index == ds.edits.target[k] and s.text in ds.edits.instructions[k] and s.text in s.prompt
        assert np.allclose(s.pose_input, ds.pose6d[s.source_index]) and np.allclose(s.pose6d, ds.pose6d[s.index])
        assert np.allclose(s.joints, d.joints[s.index]) and s.answer == data.POSE_ANSWER
    evals = ds.eval_samples("pose_edit")
    assert len(evals) == len(ds.edits) and [s.source_index for s in evals] == ds.edits.source.tolist()
    again = data.PoseBenchTasks("train", CFG, tasks=data.ALL_TASKS, mix=(1, 1, 1, 1, 1), length=400, seed=0)
    assert all(again[i].prompt == ds[i].prompt and again[i].answer == ds[i].answer for i in range(50))


def test_collate_checks_the_pose_input(ds, tok):
    s = by_task(ds, "pose_to_text", 1)[0]
    with pytest.raises(ValueError, match="no <pose_input> token"):
        data.collate([s], vocab.tiny_tokenizer(CFG), 32)
    bad = data.Sample("pose_to_text", "Describe this pose.", "x", pose_input=s.pose_input)
    with pytest.raises(ValueError, match="input pose but its prompt holds 0"):
        data.collate([bad], tok, 32)
    bad = data.Sample("vqa", s.prompt, "x")
    with pytest.raises(ValueError, match="has no input pose"):
        data.collate([bad], tok, 32)
    b = data.collate([s], tok, 32, num_pose_input_tokens=2)
    assert (b.input_ids == tok.pose_input_token_id).sum() == 2

"""model.py: forward/backward/generate on the tiny preset, the <POSE> state at rollout vs teacher
forcing, the head's log-probability against torch.distributions with an explicit covariance,
the reference policy under disable_adapter(), save/load, and bad input."""
import copy

import pytest
import torch

import body
import data
import model
import posebench
import presets
import rollout
import vocab

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)


@pytest.fixture(scope="module")
def tok():
    return vocab.tiny_tokenizer(CFG)


@pytest.fixture(scope="module")
def samples():
    return data.PoseBenchTasks("train", CFG, seed=0)


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return presets.build_tiny(tok, **kw).eval()


def batch_of(samples, tok, n, **kw):
    return data.collate([samples[i] for i in range(n)], tok, 32, **kw)  # 32 visual tokens in the tiny preset


def test_forward_backward_generate(tok, samples):
    m = tiny(tok)
    assert m.num_image_tokens == 32
    b = batch_of(samples, tok, 6)
    logits, dist, state = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert logits.shape == (6, b.input_ids.shape[1], len(tok)) and dist.mean.shape == (6, model.POSE_DIM)
    (logits.logsumexp(-1).mean() - dist.log_prob(b.pose6d.reshape(6, -1)).mean()).backward()
    assert m.pose_head.mlp[0].weight.grad.abs().sum() > 0 and m.model.pose_projector.weight.grad.abs().sum() > 0
    p = data.collate([samples[i] for i in range(3)], tok, 32, add_answer=False, pad_side="left")
    out = m.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values,
                     max_new_tokens=5, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape == (3, p.input_ids.shape[1] + 5)


def force_pose(at: int, pose_id: int):
    """A logits processor for model.sample making new token `at` <POSE> (a random model rarely emits it)."""
    def process(t, logits):
        if t == at:
            logits = torch.full_like(logits, -1e9)
            logits[:, pose_id] = 0
        return logits
    return process


def mixed_prompts(samples, tok, device="cpu"):
    """Two batches of prompts of different lengths (left padding): text-only, and with images."""
    chosen = [samples[i] for i in range(12)]
    chosen = [s for s in chosen if s.task == "text_to_pose"][:2] + [s for s in chosen if s.task != "text_to_pose"][:2]
    return [data.collate(g, tok, 32, add_answer=False, pad_side="left").to(device) for g in (chosen[:2], chosen[2:])]


def test_greedy_sample_equals_transformers_generate(tok, samples):
    m = tiny(tok, seed=3)
    for p in mixed_prompts(samples, tok):
        ref = m.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values,
                         max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
        out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 7, tok.eos_token_id, tok.pad_token_id,
                           temperature=0)
        assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("at", [3, 5])  # 5: <POSE> is the last new token, read by one more forward
def test_pose_state_at_rollout_equals_teacher_forcing(tok, samples, device, at):
    m = tiny(tok, seed=1).to(device)
    tol = 1e-5 if device == "cpu" else 1e-4  # on CUDA, cached attention sums in another order
    for p in mixed_prompts(samples, tok, device):
        T = p.input_ids.shape[1]
        out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                           logits_processor=force_pose(at, m.config.pose_token_id))
        assert out.has_pose.all() and (out.pose_pos == T + at).all() and out.states.device.type == device
        mask = torch.cat([p.attention_mask, torch.ones(len(out.states), out.sequences.shape[1] - T, dtype=torch.long,
                                                       device=device)], 1)
        _, dist, tf_state = m.forward_hybrid(out.sequences, mask, p.pixel_values, out.pose_pos)
        assert torch.allclose(out.states, tf_state, atol=tol, rtol=tol)
        assert torch.allclose(m.pose_head.distribution(out.states).mean, dist.mean, atol=tol, rtol=tol)


def test_grouped_forward_and_sampling_equal_the_full_ones(tok, samples):
    """B prompts x G answers: the prompt read once gives the full forward's answer logits, pose states and
    gradients (float rounding apart), and greedy answers equal to ungrouped ones; mixed prompt lengths."""
    m = presets.apply_lora(tiny(tok, seed=5))
    inner = m.get_base_model()
    G = 3
    chosen = [s for s in (samples[i] for i in range(12)) if s.task != "vqa"][:3]
    p = data.collate([s for s in chosen for _ in range(G)], tok, 32, add_answer=False, pad_side="left")
    T = p.input_ids.shape[1]
    torch.manual_seed(0)
    out = model.sample(inner, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                       group=G, logits_processor=force_pose(2, inner.config.pose_token_id))
    greedy = [model.sample(inner, p.input_ids, p.attention_mask, p.pixel_values, 6, tok.eos_token_id, tok.pad_token_id,
                           temperature=0, group=g).sequences for g in (1, G)]
    assert torch.equal(greedy[0], greedy[1])
    mask = torch.cat([p.attention_mask, (out.sequences[:, T:] != tok.pad_token_id).long()], 1)
    results = []
    for grouped in (False, True):
        m.zero_grad()
        if grouped:
            logits, dist, state = model.forward_grouped(inner, out.sequences, mask, p.pixel_values, T, G, out.pose_pos)
        else:
            logits, dist, state = inner.forward_hybrid(out.sequences, mask, p.pixel_values, out.pose_pos)
            logits = logits[:, T - 1:-1]
        (logits.logsumexp(-1)[mask[:, T:].bool()].sum() + dist.mean[out.has_pose].sum()).backward()
        grads = {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}
        results.append((logits, state, grads))
    (l0, s0, g0), (l1, s1, g1) = results
    valid = mask[:, T:].bool()
    has = out.has_pose  # (a row that drew eos first has no <POSE>: its state is unused)
    assert has.sum() >= 6 and torch.allclose(l0[valid], l1[valid], atol=1e-5)
    assert torch.allclose(s0[has], s1[has], atol=1e-5) and torch.allclose(s1[has], out.states[has], atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-4, rtol=1e-4), n
    with pytest.raises(ValueError, match="not 2 prompts repeated 3"):
        mixed = torch.tensor([0, 3, 1, 4, 2, 5])
        model.forward_grouped(inner, out.sequences[mixed], mask[mixed], None, T, G, out.pose_pos[mixed])


def test_sample_draws_from_the_tempered_softmax_and_stops_at_eos(tok, samples):
    """The first new token of one prompt repeated 4000 times: its frequencies are softmax(logits / 0.5)
    with the image placeholder masked; rows that drew eos are padded afterwards."""
    m = tiny(tok, seed=4)
    with torch.no_grad():
        m.lm_head.weight.mul_(10)  # peaked: at temperature 1 the frequencies would be 0.35 away (TV)
    s = next(samples[i] for i in range(20) if samples[i].image is not None)  # 4000 copies, encoded once
    p = data.collate([s] * 4000, tok, 32, add_answer=False, pad_side="left")
    torch.manual_seed(0)
    out = model.sample(m, p.input_ids, p.attention_mask, p.pixel_values, 2, tok.eos_token_id, tok.pad_token_id,
                       temperature=0.5)
    with torch.no_grad():
        logits = m.forward_hybrid(p.input_ids[:1], p.attention_mask[:1], p.pixel_values[:1])[0][0, -1].float()
    logits[m.config.image_token_id] = float("-inf")
    want = torch.softmax(logits / 0.5, -1)
    first = out.sequences[:, p.input_ids.shape[1]]
    freq = torch.bincount(first, minlength=len(want)).float() / len(first)
    assert 0.3 < want.max() < 0.7 and (freq - want).abs().sum() / 2 < 0.05  # total variation
    ended = first == tok.eos_token_id
    if out.sequences.shape[1] > p.input_ids.shape[1] + 1:
        assert (out.sequences[ended, -1] == tok.pad_token_id).all()


@pytest.mark.parametrize("rank", [0, 3])
def test_head_log_prob_equals_explicit_gaussian(rank):
    torch.manual_seed(0)
    head = model.GaussianPoseHead(32, model.POSE_DIM, rank=rank)
    with torch.no_grad():  # make the factor and the spread far from their initial values
        head.mlp[2].weight.normal_(0, 0.5)
        head.cov_mlp[2].weight.normal_(0, 0.5)
    h = torch.randn(5, 32)
    mean, log_std, factor = head(h)
    dist = head.distribution(h)
    cov = factor @ factor.transpose(-1, -2) + torch.diag_embed(torch.exp(2 * log_std))  # Eq. 2's Sigma
    ref = torch.distributions.MultivariateNormal(mean.double(), covariance_matrix=cov.double())
    p = mean + 0.3 * torch.randn_like(mean)
    assert torch.allclose(dist.log_prob(p).double(), ref.log_prob(p.double()), rtol=1e-4, atol=1e-3)
    assert torch.allclose(dist.entropy().double(), ref.entropy(), rtol=1e-4, atol=1e-3)
    # Bounds: log-std in [min, max], factor entries in [-max_factor, max_factor].
    assert (log_std >= head.log_std_min).all() and (log_std <= head.log_std_max).all()
    assert factor.numel() == 0 or factor.abs().max() <= head.max_factor


def test_head_starts_at_the_rest_pose_and_deterministic_head_is_fixed():
    head = model.GaussianPoseHead(16, model.POSE_DIM, rank=2)
    mean, log_std, _ = head(torch.zeros(1, 16))
    assert torch.allclose(mean, model.IDENTITY_6D.repeat(24)[None], atol=1e-2)  # near the rest pose
    assert torch.allclose(log_std, torch.full_like(log_std, -2.0), atol=1e-2)
    det = model.GaussianPoseHead(16, model.POSE_DIM, deterministic=True)
    d = det.distribution(torch.randn(3, 16))
    assert torch.allclose(d.stddev, torch.full((3, model.POSE_DIM), det.fixed_std))


def spread_head(rank: int, seed: int):
    """A pose head whose covariance output is far from its init (uneven spreads), and 4 states."""
    torch.manual_seed(seed)
    head = model.GaussianPoseHead(32, model.POSE_DIM, rank=rank)
    with torch.no_grad():
        head.cov_mlp[2].weight.normal_(0, 0.5)
    return head, torch.randn(4, 32)


@pytest.mark.parametrize("rank", [0, 3])
def test_tempered_head_is_the_gaussian_with_scaled_covariance(rank):
    """train_rft's --pose_temperature tau: N(mu, tau^2 Sigma), checked against the covariance written out."""
    head, h = spread_head(rank, seed=1)
    mean, log_std, factor = head(h)
    tau = 0.3
    cov = tau ** 2 * (factor @ factor.transpose(-1, -2) + torch.diag_embed(torch.exp(2 * log_std)))
    ref = torch.distributions.MultivariateNormal(mean.double(), covariance_matrix=cov.double())
    dist = model.tempered(head.distribution(h), tau)
    p = mean + 0.05 * torch.randn_like(mean)
    assert torch.allclose(dist.log_prob(p).double(), ref.log_prob(p.double()), rtol=1e-4, atol=1e-3)
    assert torch.allclose(dist.mean, mean)
    assert model.tempered(head.distribution(h), 1.0).stddev.equal(head.distribution(h).stddev)


@pytest.mark.parametrize("rank", [0, 3])
def test_marginal_is_the_sub_block_gaussian(rank):
    """train_rft's --explore_root false: the body's marginal, against the covariance's sub-block written out."""
    head, h = spread_head(rank, seed=2)
    mean, log_std, factor = (x.double() for x in head(h))  # float64: the algebra, exactly
    cov = factor @ factor.transpose(-1, -2) + torch.diag_embed(torch.exp(2 * log_std))
    ref = torch.distributions.MultivariateNormal(mean[:, 6:], covariance_matrix=cov[:, 6:, 6:])
    dist = model.marginal(model.gaussian(mean, log_std, factor), 6)
    p = mean[:, 6:] + 0.05 * torch.randn(4, model.POSE_DIM - 6, dtype=torch.float64)
    assert dist.event_shape == (model.POSE_DIM - 6,)
    assert torch.allclose(dist.log_prob(p), ref.log_prob(p), rtol=1e-9, atol=1e-6)


def test_rotation_basis_spans_the_directions_a_rotation_depends_on():
    """--pose_space rotations: U's columns are orthonormal, the Jacobian of Gram-Schmidt (by autograd)
    vanishes on their complement and has full rank on them; start=1 leaves the root out."""
    pose = torch.randn(3, model.POSE_DIM, dtype=torch.float64)
    basis = model.rotation_basis(pose)
    assert basis.shape == (3, model.POSE_DIM, 72)
    assert torch.allclose(basis.transpose(1, 2) @ basis, torch.eye(72, dtype=torch.float64).expand(3, 72, 72),
                          atol=1e-12)
    for n in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v: body.rot6d_to_matrix(v.reshape(-1, 6)).reshape(-1), pose[n])  # (24 * 9, 144)
        unseen = torch.eye(model.POSE_DIM, dtype=torch.float64) - basis[n] @ basis[n].T
        assert (jac @ unseen).abs().max() < 1e-10
        assert torch.linalg.matrix_rank(jac @ basis[n]) == 72
    body_only = model.rotation_basis(pose, start=1)
    assert body_only.shape == (3, model.POSE_DIM, 69) and torch.equal(body_only, basis[..., 3:])
    assert body_only[:, :model.ROOT_DIMS].abs().max() == 0


@pytest.mark.parametrize("rank", [0, 3])
def test_projected_is_the_gaussian_of_the_projection(rank):
    """N(U^T mu, U^T Sigma U) against the dense covariance written out, low-rank and diagonal heads."""
    head, h = spread_head(rank, seed=3)
    mean, log_std, factor = (x.double() for x in head(h))
    cov = factor @ factor.transpose(-1, -2) + torch.diag_embed(torch.exp(2 * log_std))
    basis = model.rotation_basis(mean)
    ut = basis.transpose(1, 2)
    ref = torch.distributions.MultivariateNormal((ut @ mean[..., None])[..., 0], covariance_matrix=ut @ cov @ basis)
    dist = model.projected(model.gaussian(mean, log_std, factor), basis)
    y = (ut @ (mean + 0.05 * torch.randn_like(mean))[..., None])[..., 0]
    assert dist.event_shape == (72,)
    assert torch.allclose(dist.log_prob(y), ref.log_prob(y), rtol=1e-9, atol=1e-6)


def test_mean_and_covariance_networks_share_no_parameter():
    """The covariance's NLL must not move the mean (model.GaussianPoseHead's docstring)."""
    head = model.GaussianPoseHead(16, model.POSE_DIM, rank=2)
    h = torch.randn(5, 16)
    dist = model.detach_mean(head.distribution(h))
    (-dist.log_prob(torch.randn(5, model.POSE_DIM))).sum().backward()
    assert all(p.grad is None for p in head.mlp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.cov_mlp.parameters())


def train_steps(policy, b, n=3, lr=1e-2):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(n):
        logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.labels[:,
                                                                                                        1:].reshape(-1),
                                                 ignore_index=-100) - dist.log_prob(b.pose6d.reshape(len(b.tasks),
                                                                                                     -1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_disable_adapter_is_the_initial_policy_after_training(tok, samples):
    m = tiny(tok, seed=3)
    b = batch_of(samples, tok, 6)
    with torch.no_grad():
        logits0, dist0, _ = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    frozen_before = {n: p.detach().clone() for n, p in m.named_parameters()}
    policy = presets.apply_lora(m)
    policy.train()
    train_steps(policy, b)
    policy.eval()
    with torch.no_grad():
        logits1, dist1, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        assert (logits1 - logits0).abs().max() > 1e-3 and (dist1.mean - dist0.mean).abs().max() > 1e-3
        with policy.disable_adapter():
            logits_ref, dist_ref, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values,
                                                            b.pose_token_pos)
    assert torch.allclose(logits_ref, logits0, atol=1e-5)
    assert torch.allclose(dist_ref.mean, dist0.mean, atol=1e-6)
    assert torch.allclose(dist_ref.stddev, dist0.stddev, atol=1e-6)
    # The base weights themselves never moved (no second copy needed for pi_ref).
    base = dict(policy.get_base_model().named_parameters())
    for n, p in frozen_before.items():
        key = next((k for k in base if k.replace(".base_layer", "") == n), None)
        if key is not None and "modules_to_save" not in key:
            assert torch.equal(base[key], p), n


def test_parameters_change_after_one_step_and_frozen_ones_do_not(tok, samples):
    policy = presets.apply_lora(tiny(tok, seed=4))
    policy.train()
    b = batch_of(samples, tok, 6)
    assert b.pixel_values is not None and b.pose_valid.any()  # every trainable part gets a gradient
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    train_steps(policy, b, n=1)
    after = dict(policy.named_parameters())
    for n, p in after.items():
        changed = not torch.equal(before[n], p)
        if p.requires_grad and ("lora_B" in n or "modules_to_save" in n or "trainable_tokens" in n):
            assert changed, n
        if not p.requires_grad:
            assert not changed, n
    frozen = [n for n, p in after.items() if "vision_tower" in n or "pose_tower" in n]
    assert frozen and not any(after[n].requires_grad for n in frozen)


def test_save_load_identical_and_preset_checked(tok, samples, tmp_path):
    m = tiny(tok, seed=5)
    b = batch_of(samples, tok, 4)
    presets.save_base(m, tok, str(tmp_path / "run" / "base"), "tiny")
    policy = presets.apply_lora(copy.deepcopy(m))
    policy.train()
    train_steps(policy, b, n=2)
    policy.eval()
    policy.save_pretrained(str(tmp_path / "run" / "step-000002" / "adapter"))
    (tmp_path / "run" / "LATEST").write_text("step-000002")
    loaded, tok2, _ = presets.load_policy(str(tmp_path / "run"), "tiny")
    loaded.eval()
    with torch.no_grad():
        a = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        c = loaded.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1].mean, c[1].mean) and torch.equal(a[1].stddev, c[1].stddev)
    assert tok2.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="holds a 'tiny' checkpoint, but the 'smol' preset"):
        presets.load_policy(str(tmp_path / "run"), "smol")
    with pytest.raises(FileNotFoundError, match="not a complete PoseLlava base checkpoint"):
        presets.load_base(str(tmp_path / "nowhere"))
    (tmp_path / "run" / "base" / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        presets.load_policy(str(tmp_path / "run"))


def test_bad_image_size_and_missing_placeholder(tok, samples):
    m = tiny(tok, seed=6)
    b = batch_of(samples, tok, 4)
    assert b.pixel_values is not None
    with pytest.raises(ValueError, match="images are 32x32 but the CLIP tower of this model takes 64x64"):
        m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values[..., :32, :32], b.pose_token_pos)
    s = next(samples[i] for i in range(20) if samples[i].task == "image_to_pose")
    bad = data.Sample(**{**s.__dict__, "prompt": s.prompt.replace(data.IMAGE_TOKEN, "")})
    with pytest.raises(ValueError, match="image"):
        data.collate([bad], tok, 32)
    no_pose = data.Sample(**{**s.__dict__, "answer": "The pose is unknown."})
    with pytest.raises(ValueError, match="POSE"):
        data.collate([no_pose], tok, 32)


def test_pose_kl_in_float64_against_the_dense_formula():
    """rollout.pose_kl (the KL term of HyGRPO and --algo direct): 0 for a Gaussian with itself, and the
    textbook KL of two dense Gaussians, 1/2 (tr(S2^-1 S1) + d^T S2^-1 d - P + log|S2| - log|S1|)."""
    torch.manual_seed(0)
    head = model.GaussianPoseHead(32, model.POSE_DIM, rank=4, mlp_hidden=64)
    with torch.no_grad():
        head.cov_mlp[2].weight.normal_(0, 0.05)  # covariances that differ between states
        head.mlp[2].weight.normal_(0, 0.02)
    d1, d2 = head.distribution(torch.randn(5, 32)), head.distribution(torch.randn(5, 32))
    assert rollout.pose_kl(d1, d1).abs().max() < 1e-6

    def dense(dist):  # mean and W W^T + diag(sigma^2), formed in float64
        f = dist.cov_factor.double()
        return dist.loc.double(), f @ f.transpose(-1, -2) + torch.diag_embed(dist.cov_diag.double())

    (m1, s1), (m2, s2) = dense(d1), dense(d2)
    s2_inv, d = torch.linalg.inv(s2), (m2 - m1)[..., None]
    ref = 0.5 * (torch.einsum("nij,nji->n", s2_inv, s1) + (d.transpose(-1, -2) @ s2_inv @ d)[:, 0, 0]
                 - model.POSE_DIM + torch.logdet(s2) - torch.logdet(s1))
    assert ref.min() > 1.0
    assert torch.allclose(rollout.pose_kl(d1, d2).double(), ref, rtol=1e-5)

"""--grad_accum N: N micro-batches give, after one optimizer step, the weights and optimizer state of one
batch of N times their size (train_sft.py end to end; train_rft.hygrpo_step on fixed rollouts and rewards).
The optimizer state is compared too: Adam's first update is about lr x sign(gradient), blind to a wrong
scale (and a near-zero gradient's sign is float32 noise, so the weights agree to 1 % of lr), while its
first moment is 0.1 x the gradient itself."""
import copy
import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import body
import data
import hygrpo
import posebench
import presets
import rewards
import rollout
import train_rft
import train_sft
import vocab
from test_train_sft import TINY_RUN

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)


def step_state(run_dir):
    """The adapter's tensors and the optimizer's first and second moments after step 1 of a run."""
    step = os.path.join(run_dir, "step-000001")
    weights = load_file(os.path.join(step, "adapter", "adapter_model.safetensors"))
    state = torch.load(os.path.join(step, "train_state.pt"), weights_only=False)
    names = state["param_names"]
    moments = {f"{names[i]}/{k}": s[k] for i, s in state["optimizer"]["state"].items() for k in ("exp_avg",
                                                                                                 "exp_avg_sq")}
    return weights, moments


def first_gradient(moments, key):
    """The first step's gradient of adapter tensor `key`: Adam's first moment after one step is 0.1 x it."""
    for name, v in moments.items():
        if name.endswith("/exp_avg") and name[:-len("/exp_avg")].replace("modules_to_save.default.", "") \
                .replace(".default", "") == key:
            return v / 0.1
    raise KeyError(f"no optimizer state for {key}")


def test_sft_micro_batches_equal_one_batch(tmp_path):
    runs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"accum{n}"
        train_sft.main(TINY_RUN + ["--steps", "1", "--batch_size", "8", "--grad_accum", str(n), "--head_fit_steps", "0",
                                   "--eval_samples", "0", "--out_dir", str(out)])
        runs[n] = step_state(out)
    w1, m1 = runs[1]
    assert max(v.abs().max() for k, v in m1.items() if k.endswith("exp_avg")) > 1e-4  # a gradient to compare
    for n in (2, 4):
        w, m = runs[n]
        assert w.keys() == w1.keys() and m.keys() == m1.keys()
        for k in w1:  # micro-batches pad to their own longest sample: float32 rounding apart, the same
            # (measured: 1.2e-6, at lr 1e-3). Adam's first update is lr * g / (|g| + eps): where |g| is
            # below eps = 1e-8, a float32 difference of g is multiplied by lr / eps; those entries are
            # left to the moments' check below, which compares g itself
            seen = first_gradient(m1, k).abs() >= 1e-8  # (none in a LoRA A: its B starts at zero)
            assert torch.allclose(w[k][seen], w1[k][seen], rtol=0, atol=1e-5), k
        for k in m1:  # (measured: 6.6e-7 of the tensor's largest entry)
            assert (m[k] - m1[k]).abs().max() <= 1e-5 * m1[k].abs().max(), k


def test_sft_batch_must_split_over_micro_batches(tmp_path):
    with pytest.raises(SystemExit, match=r"--batch_size 6 must be divisible by .* --grad_accum \(4\) = 4"):
        train_sft.main(TINY_RUN + ["--batch_size", "6", "--grad_accum", "4", "--out_dir", str(tmp_path / "x")])


def slice_rollout(ro, rows):
    """Rows `rows` (a slice of whole groups) of a text-only rollout."""
    assert ro.pixel_values is None and ro.pose_values is None
    return dataclasses.replace(ro, sequences=ro.sequences[rows], attention_mask=ro.attention_mask[rows],
                               completion_mask=ro.completion_mask[rows], pose_pos=ro.pose_pos[rows],
                               has_pose=ro.has_pose[rows], pose=ro.pose[rows], texts=ro.texts[rows],
                               pose_mean=ro.pose_mean[rows])


@pytest.mark.parametrize("n_micro", [2, 4])
def test_rft_micro_batches_equal_one_batch(monkeypatch, n_micro):
    """One HyGRPO step (two iterations, so the clipped, off-policy branch runs too) on B = 4 prompts x G = 3,
    as one batch and as n_micro micro-batches, on the same rollouts and rewards: one sampled rollout and
    seeded rewards with a pose on most samples, cut by rows for the micro-batches."""
    B, G = 4, 3
    tok = vocab.tiny_tokenizer(CFG)
    torch.manual_seed(0)
    policy = presets.apply_lora(presets.build_tiny(tok))
    tasks = data.PoseBenchTasks("train", CFG, tasks=("text_to_pose",), mix=(1.0,), seed=0)
    samples = [tasks[i] for i in range(B) for _ in range(G)]
    args = train_rft.Args(batch_size=B, group_size=G, max_new_tokens=6, num_iterations=2, lr=1e-3)
    policy.eval()
    ro = rollout.rollout(policy, tok, samples, args, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    N = B * G
    has_pose = torch.rand(N, generator=gen) > 0.25
    ro = dataclasses.replace(ro, has_pose=has_pose, pose_pos=torch.where(has_pose, ro.prompt_len + 1, -1))
    with torch.no_grad():  # the pose: a sample of the policy at that state, as a rollout draws it
        _, dist = rollout.logprobs(policy, ro, rollout.suppressed_tokens(policy, tok), args.pose_temperature)
        torch.manual_seed(2)
        ro = dataclasses.replace(ro, pose=torch.where(has_pose[:, None], dist.sample(), 0.0), pose_mean=dist.mean)
    r_d, r_c = torch.rand(N, generator=gen), torch.rand(N, generator=gen)
    r_d[G:2 * G] = 0.5  # a group with no discrete signal
    r = {"format": r_d, "text": torch.zeros(N), "joint": r_c, "semantic": torch.zeros(N)}
    where = {"format": torch.ones(N, dtype=torch.bool), "text": torch.zeros(N, dtype=torch.bool), "joint": has_pose,
             "semantic": torch.zeros(N, dtype=torch.bool)}

    def one_step(pol, n):
        calls = []

        def fake_rollout(p, t, part, a, device):
            k = len(calls)
            calls.append(len(part))
            return slice_rollout(ro, slice(k * len(part), (k + 1) * len(part)))

        def fake_score(rollout, part, *a, **kw):
            rows = slice((len(calls) - 1) * len(part), len(calls) * len(part))
            return ({k: v[rows] for k, v in r.items()}, r_d[rows], r_c[rows], has_pose[rows],
                    {k: v[rows] for k, v in where.items()})

        monkeypatch.setattr(rollout, "rollout", fake_rollout)
        monkeypatch.setattr(rewards, "score", fake_score)
        params = [p for p in pol.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        ctx = train_rft.StepContext(pol, tok, opt, params, None, None, body.BodyModel(), hygrpo.make_loss(False),
                                    rollout.suppressed_tokens(pol, tok))
        rec = train_rft.hygrpo_step(ctx, samples, B, G, dataclasses.replace(args, grad_accum=n))
        assert "skipped" not in rec and calls == [N // n] * n
        return rec, params, opt

    rec1, p1, opt1 = one_step(copy.deepcopy(policy), 1)
    recn, pn, optn = one_step(copy.deepcopy(policy), n_micro)
    assert rec1["charts/clipfrac_continuous"] > 0 or rec1["charts/clipfrac_discrete"] > 0  # off-policy in iteration 2
    zero = torch.zeros(())  # (a parameter no loss reaches has no optimizer state)
    m1 = [opt1.state[p]["exp_avg"] if p in opt1.state else zero for p in p1]
    mn = [optn.state[p]["exp_avg"] if p in optn.state else zero for p in pn]
    top = max(m.abs().max() for m in m1)
    assert top > 1e-5 and [m is zero for m in m1] == [m is zero for m in mn]
    for a, b, ma, mb in zip(p1, pn, m1, mn):
        # two Adam updates, where a near-zero gradient's direction is float32 noise (measured: 2.6e-5 at most,
        # on entries whose first moment is 1e-10), so the weights agree to 5 % of lr; the moments are the sharp check
        assert torch.allclose(a, b, rtol=0, atol=5e-5)
        assert (ma - mb).abs().max() <= 1e-4 * ma.abs().max() + 1e-6 * top  # float32 rounding of the sums
    for k in ("losses/pg_discrete", "losses/pg_continuous", "losses/kl_token", "losses/kl_pose", "losses/total",
              "rewards/format", "rewards/joint", "charts/pose_std_mean", "charts/frac_zero_std_groups"):
        assert recn[k] == pytest.approx(rec1[k], rel=1e-4, abs=1e-7), k

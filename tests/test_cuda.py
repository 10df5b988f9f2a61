"""On a CUDA GPU only (skipped elsewhere; CI has none): the compiled HyGRPO loss equals the eager one
on CUDA tensors; the tiny policy computes on CUDA what it computes on CPU (forward, the head); the
rewards with the reward models on CUDA equal the CPU ones; a bf16-autocast base stays close to
float32 with float32 head outputs. test_model.py checks the `<POSE>` state at rollout on CUDA too,
the scripts run on CUDA whenever it is present (test_train_*.py), and tests/gpu_7b.py runs the 7B
preset at full size."""
import pytest
import torch

import data
import hygrpo
import rollout
from test_hygrpo import make_inputs
from test_model import batch_of, samples, tiny, tok  # noqa: F401  (samples, tok: fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_compiled_loss_equals_eager_on_cuda(dtype, tol):
    x = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in make_inputs(11, dtype=dtype).items()}
    compiled = hygrpo.make_loss(None)  # the default on CUDA
    assert compiled is not hygrpo.hygrpo_loss
    out = []
    for fn in (hygrpo.hygrpo_loss, compiled):
        token_logp = x["token_logp"].clone().requires_grad_(True)
        pose_logp = x["pose_logp"].clone().requires_grad_(True)
        loss, stats = fn(**{**x, "token_logp": token_logp, "pose_logp": pose_logp})
        loss.backward()
        out.append((loss.detach(), stats, token_logp.grad, pose_logp.grad))
    (l0, s0, gt0, gp0), (l1, s1, gt1, gp1) = out
    torch.testing.assert_close(l1, l0, atol=tol, rtol=tol)
    for k in s0:
        torch.testing.assert_close(s1[k].detach(), s0[k].detach(), atol=tol, rtol=tol, msg=k)
    torch.testing.assert_close(gt1, gt0, atol=tol, rtol=tol)
    torch.testing.assert_close(gp1, gp0, atol=tol, rtol=tol)


def test_tiny_policy_on_cuda_equals_cpu(tok, samples):
    m = tiny(tok, seed=6)
    b = batch_of(samples, tok, 6)
    with torch.no_grad():
        logits, dist, state = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        m.to(CUDA)
        bc = b.to(CUDA)
        logits_c, dist_c, state_c = m.forward_hybrid(bc.input_ids, bc.attention_mask, bc.pixel_values,
                                                     bc.pose_token_pos)
    # float32 on both sides (TF32 is off by default) but another summation order: the logits were
    # 1.9e-4 apart on an H200, so 1e-3 (a device bug moves them by far more)
    for c, ref in ((logits_c, logits), (state_c, state), (dist_c.mean, dist.mean), (dist_c.stddev, dist.stddev)):
        torch.testing.assert_close(c.cpu(), ref, atol=1e-3, rtol=1e-3)
    pose = dist.sample()
    torch.testing.assert_close(dist_c.log_prob(pose.to(CUDA)).cpu(), dist.log_prob(pose), atol=1e-3, rtol=1e-5)


def test_bf16_autocast_on_cuda_is_close_to_float32(tok, samples):
    m = tiny(tok, seed=7).to(CUDA)
    b = batch_of(samples, tok, 6).to(CUDA)
    with torch.no_grad():
        logits, dist, _ = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
        m.config.compute_dtype = "bfloat16"  # what the 7B preset sets: forward under bf16 autocast
        logits_h, dist_h, _ = m.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    assert dist_h.mean.dtype == torch.float32 and dist_h.stddev.dtype == torch.float32  # the head runs in float32
    scale = logits.abs().max()
    assert (logits_h.float() - logits).abs().max() < 0.05 * scale  # bf16 keeps 8 bits of mantissa
    assert (dist_h.mean - dist.mean).abs().max() < 0.05 * dist.mean.abs().max()
    assert not torch.equal(logits_h.float(), logits)  # autocast did run in bf16


def test_rewards_with_the_reward_models_on_cuda_equal_cpu():
    """rewards.score with the body model, the reward retriever and the sentence encoder on the GPU
    (as train_rft.py places them) returns the CPU rewards, on CPU. Two bugs the first GPU run found:
    CPU poses into a CUDA body model, and CUDA semantic rewards written into a CPU tensor."""
    import numpy as np

    import body
    import posebench
    import retrieval
    import rewards
    import train_rft

    tasks = data.PoseBenchTasks("train", posebench.BenchConfig(n_train=48, n_val=16, n_test=40), seed=0)
    chosen = [tasks[i] for i in range(40) if tasks[i].task in ("image_to_pose", "text_to_pose")][:6]
    assert {s.task for s in chosen} == {"image_to_pose", "text_to_pose"}
    g = torch.Generator().manual_seed(0)
    pose = torch.as_tensor(np.stack([s.pose6d.reshape(-1) for s in chosen])) + 0.1 * torch.randn(6, 144, generator=g)
    ro = rollout.Rollout(sequences=None, attention_mask=None, completion_mask=None, pixel_values=None, prompt_len=0,
                         pose_pos=torch.full((6,), 40), has_pose=torch.ones(6, dtype=torch.bool), pose=pose,
                         texts=[data.POSE_ANSWER] * 6)
    torch.manual_seed(0)
    retriever = retrieval.TextPoseRetriever(retrieval.RetrieverConfig(embed_dim=16, hidden_dim=32)).eval()
    (r0, rd0, rc0, v0, _), (r1, rd1, rc1, v1, _) = [
        rewards.score(ro, chosen, rewards.TextSimilarity("", dev), retriever.to(dev), body.BodyModel().to(dev),
                      train_rft.Args()) for dev in ("cpu", "cuda")]
    assert v1.all() and torch.equal(v0, v1)
    for k in r0:
        assert r1[k].device.type == "cpu", k
        torch.testing.assert_close(r1[k], r0[k], atol=1e-4, rtol=1e-4, msg=k)
    assert (r1["joint"] > 0).any() and (r1["semantic"] != 0).any()
    torch.testing.assert_close(rd1, rd0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rc1, rc0, atol=1e-4, rtol=1e-4)

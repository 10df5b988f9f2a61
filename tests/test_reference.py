"""pi_ref = pi_init = the SFT policy bit for bit (presets.rft_policy: the SFT adapter frozen beside a fresh
RFT LoRA, nothing merged), on the 7B preset at toy width (bf16 weights, autocast): log-probs and pose
Gaussians torch.equal to the SFT policy's, before and after an RFT update, and after the RFT run is saved
and loaded again; the former merge (merge_and_unload into the bf16 weights) is measurably not."""
import os

import pytest
import torch

import data
import posevit
import presets
import train_sft
from test_real_model import TOY_VIT, samples
from test_real_scripts import write_real_assets

PRESET = "llava-1.5-7b"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A toy-width 7B-preset SFT run of 2 steps at a large learning rate (an adapter far from zero)."""
    d = tmp_path_factory.mktemp("ref")
    flags = write_real_assets(d)
    old, posevit.VIT_H = posevit.VIT_H, TOY_VIT
    try:
        train_sft.main(["--preset", PRESET, "--llava_path", str(d / "llava"), "--hmr2_ckpt", str(d / "hmr2.ckpt"),
                        "--out_dir", str(d / "sft"), "--steps", "2", "--batch_size", "3", "--warmup_steps", "1",
                        "--lr", "1e-2", "--head_rank", "2", *flags])
    finally:
        posevit.VIT_H = old
    return d / "sft"


def outputs(policy, b):
    """Token log-probs (the log-softmax of the logits, in float32 as rollout.logprobs takes them) and the
    pose Gaussian's log-density of the targets, mean and spread."""
    with torch.no_grad():
        logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    return (torch.log_softmax(logits.float(), -1), dist.log_prob(b.pose6d.reshape(len(b.input_ids), -1)),
            dist.mean, dist.stddev)


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_pi_ref_is_the_sft_policy_bit_for_bit_on_the_7b_preset(sft_run, tmp_path):
    sft, tok, step = presets.load_policy(str(sft_run), PRESET)  # the SFT policy as evaluate.py loads it
    sft.eval()
    b = data.collate(samples(), tok, sft.get_base_model().num_image_tokens)
    want = outputs(sft, b)
    torch.manual_seed(0)
    rft, _ = presets.rft_policy(str(sft_run), step, PRESET, rank=4, alpha=8)
    rft.eval()
    with presets.reference(rft):
        assert equal(outputs(rft, b), want)  # pi_ref
    assert equal(outputs(rft, b), want)  # pi_init: the fresh LoRA adds exactly zero
    trained = {n for n, p in rft.named_parameters() if p.requires_grad}
    assert trained and all(".default" in n for n in trained)
    assert any("lora_A.reference" in n for n, _ in rft.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in rft.named_parameters() if n in trained)

    # one RFT update: the policy moves, pi_ref stays the SFT policy bit for bit
    rft.train()
    opt = torch.optim.AdamW([p for p in rft.parameters() if p.requires_grad], lr=1e-2)
    logits, dist, _ = rft.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
    (logits.float().logsumexp(-1).mean() + dist.mean.square().mean()).backward()
    opt.step()
    rft.eval()
    moved = outputs(rft, b)
    assert (moved[0] - want[0]).abs().max() > 1e-3
    with presets.reference(rft):
        assert equal(outputs(rft, b), want)
    assert {n for n, p in rft.named_parameters() if p.requires_grad} == trained  # the context restores them

    # saved as train_rft.py saves it (its adapter; base/ a link, reference/ the SFT adapter) and loaded again
    run = tmp_path / "rft"
    os.makedirs(run / "step-000001")
    presets.write_rft_start(str(sft_run), step, str(run))
    rft.save_pretrained(str(run / "step-000001" / "adapter"), selected_adapters=["default"])
    (run / "LATEST").write_text("step-000001")
    assert os.path.islink(run / "base") and not os.path.exists(run / "step-000001" / "adapter" / presets.REFERENCE)
    loaded, _, _ = presets.load_policy(str(run), PRESET)
    loaded.eval()
    assert equal(outputs(loaded, b), moved)
    with presets.reference(loaded):
        assert equal(outputs(loaded, b), want)


def test_the_former_merge_is_not_the_sft_policy_on_the_7b_preset(sft_run, capsys):
    """What rft_policy avoids: merge_and_unload adds the SFT update into the bf16 weights, rounding it."""
    sft, tok, _ = presets.load_policy(str(sft_run), PRESET)
    sft.eval()
    b = data.collate(samples(), tok, sft.get_base_model().num_image_tokens)
    want = outputs(sft, b)
    merged = sft.merge_and_unload()
    merged.eval()
    got = outputs(merged, b)
    diff = (got[0] - want[0]).abs().max().item()
    with capsys.disabled():
        print(f"\nmerged SFT adapter, 7B preset at toy width: max |log-prob difference| {diff:.3g}, "
              f"max |pose log-density difference| {(got[1] - want[1]).abs().max().item():.3g}")
    assert diff > 0


def test_a_moved_sft_run_is_named_with_the_fix(tmp_path):
    import checkpoint

    os.makedirs(tmp_path / "sft" / "base")
    os.makedirs(tmp_path / "rft")
    os.symlink(str(tmp_path / "sft" / "base"), str(tmp_path / "rft" / "base"))
    os.rename(tmp_path / "sft", tmp_path / "sft_moved")
    with pytest.raises(SystemExit, match=r"its base/ links to .*sft/base, which is gone: the SFT run .*\(ln -sfn"):
        checkpoint.run_step(str(tmp_path / "rft"), "--ckpt")

"""checkpoint.py: a checkpoint holding a NaN/inf is never written, a full disk is named, damaged runs
(truncated adapter, base or train_state.pt, a missing adapter, a LATEST of garbage bytes) are named
with the fix and `--resume` goes on from the newest intact step, and flags and out-directories are
checked before any work."""
import errno
import os
from dataclasses import dataclass, field

import pytest
import torch

import checkpoint
import posebench
import presets
import vocab

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)


@dataclass
class Flags:
    lr: float = 1e-3
    steps: int = 4
    mix: list = field(default_factory=lambda: [0.4, 0.4, 0.2])
    keep_checkpoints: int = 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run directory with two saved steps, and its policy and optimizer."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    tok = vocab.tiny_tokenizer(CFG)
    torch.manual_seed(0)
    base = presets.build_tiny(tok)
    presets.save_base(base, tok, str(out / "base"), "tiny")
    policy = presets.apply_lora(base)
    names, params = checkpoint.trainable_params(policy)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    for step in (2, 4):
        checkpoint.save_checkpoint(str(out), step, policy, opt, Flags(), names)
    return out, policy, opt, names


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))


def test_nonfinite_weights_or_optimizer_state_are_never_saved(run, tmp_path):
    out, policy, opt, names = run
    d = copy_run(out, tmp_path / "run")
    p = next(p for n, p in policy.named_parameters() if p.requires_grad and "lora_B" in n)
    keep = p.detach().clone()
    try:
        with torch.no_grad():
            p[0, 0] = float("nan")
        with pytest.raises(SystemExit, match=r"refusing to save step 6: NaN/inf in 1 tensor\(s\) \(.*lora_B.*\); "
                                             r"the last good checkpoint is .*step-000004 \(LATEST"):
            checkpoint.save_checkpoint(str(d), 6, policy, opt, Flags(), names)
        with torch.no_grad():
            p.copy_(keep)
        state = opt.state[p]["exp_avg_sq"]
        state[0, 0] = float("inf")
        with pytest.raises(SystemExit, match=r"NaN/inf in 1 tensor\(s\) \(.*lora_B.* \(optimizer exp_avg_sq\)"):
            checkpoint.save_checkpoint(str(d), 6, policy, opt, Flags(), names)
        state[0, 0] = 0.0
    finally:
        with torch.no_grad():
            p.copy_(keep)
    assert not (d / "step-000006").exists() and (d / "LATEST").read_text() == "step-000004"


def test_a_full_disk_is_named_and_leaves_the_last_checkpoint(run, tmp_path, monkeypatch):
    out, policy, opt, names = run
    d = copy_run(out, tmp_path / "run")

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(SystemExit, match=r"no space left on the device of .* while writing .*train_state.pt .*step 6 "
                                         r"was not saved, the last good checkpoint is .*step-000004"):
        checkpoint.save_checkpoint(str(d), 6, policy, opt, Flags(), names)
    assert sorted(os.listdir(d)) == ["LATEST", "base", "step-000002", "step-000004"]  # no partial step left


def test_damaged_runs_are_named_and_resume_uses_the_newest_intact_step(run, tmp_path, capsys):
    out, *_ = run
    assert checkpoint.run_step(str(out), "--ckpt") == str(out / "step-000004")
    with pytest.raises(SystemExit, match=r"--sft_dir .*nowhere: no such directory; point it at a run of train_sft.py"):
        checkpoint.run_step(str(tmp_path / "nowhere"), "--sft_dir")
    d = copy_run(out, tmp_path / "adapter")  # a truncated adapter of the latest step
    truncate(d / "step-000004" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SystemExit, match=r"--ckpt .*adapter: its latest checkpoint step-000004 is damaged: .*"
                                         r"adapter_model.safetensors is truncated \(\d+ of its \d+ bytes\); the newest "
                                         r"intact one is step-000002: write that name into .*LATEST"):
        checkpoint.run_step(str(d), "--ckpt")
    assert checkpoint.run_step(str(d), "--out_dir", resume=True) == str(d / "step-000002")
    assert "resume: its latest checkpoint step-000004 is damaged" in capsys.readouterr().out
    d = copy_run(out, tmp_path / "state")  # a truncated train_state.pt matters to --resume only
    truncate(d / "step-000004" / "train_state.pt")
    assert checkpoint.run_step(str(d), "--ckpt") == str(d / "step-000004")
    assert checkpoint.run_step(str(d), "--out_dir", resume=True) == str(d / "step-000002")
    with pytest.raises(SystemExit,
                       match=r"train_state.pt does not load .*truncated or corrupt; resume from an earlier"):
        checkpoint.load_train_state(str(d / "step-000004"))
    d = copy_run(out, tmp_path / "gone")  # a deleted adapter file, every step
    for step in ("step-000002", "step-000004"):
        os.remove(d / step / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SystemExit, match=r"adapter_model.safetensors is missing; no intact checkpoint is left"):
        checkpoint.run_step(str(d), "--out_dir", resume=True)
    d = copy_run(out, tmp_path / "garbage")  # a LATEST of garbage bytes
    (d / "LATEST").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SystemExit,
                       match=r"LATEST holds '\(unreadable bytes\)', not the name of a step directory such as "
                             r"step-000100; the newest intact one is step-000004"):
        checkpoint.run_step(str(d), "--ckpt")
    with pytest.raises(SystemExit, match=r"holds a run \(checkpoint"):  # a new run there is refused, no traceback
        checkpoint.prepare_out_dir(str(d), resume=False, master=True)
    d = copy_run(out, tmp_path / "base")  # a truncated base model
    truncate(d / "base" / "model" / "model.safetensors", 0.9)
    with pytest.raises(SystemExit, match=r"its base model is damaged: .*model.safetensors is truncated"):
        checkpoint.run_step(str(d), "--sft_dir")
    (d / "base" / "model" / "model.safetensors").write_bytes(b"\x00" * 3)
    assert "is not a safetensors file" in checkpoint.base_problems(str(d / "base"))[0]


def test_resume_past_steps_is_refused(run):
    out, policy, opt, names = run
    state = checkpoint.load_train_state(str(out / "step-000004"))
    with pytest.raises(SystemExit, match=r"checkpoint is at step 4, past --steps 2: .*pass --steps 4 or more \(the run "
                                         r"was started with --steps 4\)"):
        checkpoint.restore_train_state(opt, state, Flags(steps=2))


def test_flags_and_out_dirs_are_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as e:
        checkpoint.check_flags(Flags(lr=float("nan"), steps=-1, mix=[1.0, float("inf")]), "x.py", {"steps": 1},
                               ("lr",))
    msg = str(e.value.code)
    assert msg.startswith("x.py: flags that cannot run (nothing was done)")
    for text in ("--lr nan: not a finite number", "--steps -1: must be >= 1", "--mix [1.0, inf]: not a finite number"):
        assert text in msg, text
    with pytest.raises(SystemExit, match=r"--lr 0.0: must be > 0"):
        checkpoint.check_flags(Flags(lr=0.0), "x.py", {}, ("lr",))
    checkpoint.check_flags(Flags(), "x.py", {"steps": 1}, ("lr",))
    with pytest.raises(SystemExit, match=r"--out_dir /proc/x: cannot write there \(.*\); pass a writable directory"):
        checkpoint.check_writable("/proc/x")
    checkpoint.check_writable(str(tmp_path / "new" / "dir"))
    assert os.listdir(tmp_path) == []  # the probe and the directories made for it are removed


def test_check_writable_when_every_rank_checks_at_once(tmp_path):
    """Every rank of a torchrun job checks the same new --out_dir at the same moment: no rank may remove a
    directory under another for good (CI once failed that way: rank 1 found `ckpt/` gone that rank 0 had made
    and removed again)."""
    import threading
    errors = []

    def check(i):
        try:
            for k in range(30):
                checkpoint.check_writable(str(tmp_path / f"run{k}" / "ckpt" / "sft"))
        except SystemExit as e:
            errors.append(str(e))

    threads = [threading.Thread(target=check, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_keep_checkpoints_removes_older_steps_never_latest(run, tmp_path):
    out, policy, opt, names = run
    d = copy_run(out, tmp_path / "run")
    for step in (6, 8, 10):
        checkpoint.save_checkpoint(str(d), step, policy, opt, Flags(keep_checkpoints=2), names)
        assert (d / "LATEST").read_text() == f"step-{step:06d}"
    assert sorted(n for n in os.listdir(d) if n.startswith("step-")) == ["step-000008", "step-000010"]
    checkpoint.save_checkpoint(str(d), 12, policy, opt, Flags(keep_checkpoints=0), names)  # 0: keep every one
    assert sorted(n for n in os.listdir(d) if n.startswith("step-")) == ["step-000008", "step-000010", "step-000012"]
    # LATEST names an older step (a resume went back to it): that one stays, whatever its age
    assert checkpoint.prune_checkpoints(str(d), 1, "step-000008") == ["step-000010"]
    assert sorted(n for n in os.listdir(d) if n.startswith("step-")) == ["step-000008", "step-000012"]
    assert checkpoint.run_step(str(d), "--ckpt") == str(d / "step-000012")

"""--report_to none|tensorboard|wandb|trackio: a missing package stops the scripts before any work, naming
it and its pip install; TensorBoard (where installed) and the W&B / trackio calls (stand-in modules with
their API, as neither is installed here) receive every number metrics.jsonl holds, at its step."""
import importlib.util
import json
import sys
import types

import pytest

import plumbing
import retrieval
import train_rft
import train_sft
from test_train_rft import RFT
from test_train_sft import TINY_RUN


def numbers(metrics_path):
    """{(key, step): value} of every number metrics.jsonl logs (records without a step at step 0)."""
    out = {}
    for line in open(metrics_path):
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("step", "time_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(k, rec["step"] or 0)] = v
    return out


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("trackio",
                                                                                                  "trackio")])
def test_a_missing_tracker_is_named_with_its_pip_install(tracker, package, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    for main in (train_sft.main, train_rft.main):
        with pytest.raises(SystemExit, match=f"--report_to {tracker} needs the {package} package, which is not "
                                             f"installed: pip install {package}"):
            main(["--report_to", tracker, "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # before any work
    with pytest.raises(SystemExit, match="--report_to mlflow: expected one of none, tensorboard, wandb, trackio"):
        train_sft.main(["--report_to", "mlflow", "--out_dir", str(tmp_path / "run")])


def test_wandb_and_trackio_get_every_number_of_metrics_jsonl(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, d, step=None):
            calls.append(("log", dict(d), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    wandb = types.SimpleNamespace(init=init)
    trackio = types.SimpleNamespace(init=init, log=Run().log, finish=Run().finish)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    for name in ("wandb", "trackio"):
        calls.clear()
        out = tmp_path / name
        out.mkdir()
        args = train_sft.Args(out_dir=str(out))
        log = plumbing.make_logger(str(out), True, name, args)
        log({"stage0/loss": 2.0})
        log({"losses/total": 1.5, "charts/lr": 1e-3, "resumed_from": "step-000001", "flag": True}, 1)
        log({"test/mpjpe_mm": 300.0, "test/none": None}, 2)
        log.close()
        assert calls[0][0] == "init" and calls[0][1]["project"] == "pose-rft" and calls[0][1]["config"]["lr"] == 1e-3
        logged = {(k, step): v for c in calls if c[0] == "log" for k, v in c[1].items() for step in [c[2]]}
        assert logged == numbers(out / "metrics.jsonl") and calls[-1] == ("finish",)
        run_id = (out / f"{name}_run_id").read_text()
        plumbing.make_logger(str(out), True, name, args)  # a resumed run: the same run id
        assert calls[-1][1].get("id", calls[-1][1].get("name")) == run_id
        assert not plumbing.make_logger(str(out), False, name, args).close()  # other ranks: no tracker


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (optional)")
def test_tensorboard_gets_every_number_of_metrics_jsonl_in_both_scripts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(run):
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}

    train_sft.main(TINY_RUN + ["--steps", "2", "--log_every", "1", "--head_fit_steps", "5", "--out_dir",
                               str(tmp_path / "sft"), "--report_to", "tensorboard"])
    retrieval.save_retriever(retrieval.TextPoseRetriever(retrieval.RetrieverConfig(embed_dim=16, hidden_dim=32)),
                             str(tmp_path / "retriever"))
    train_rft.main(RFT + ["--steps", "2", "--eval_samples", "4", "--sft_dir", str(tmp_path / "sft"),
                          "--reward_retriever",
                          str(tmp_path / "retriever"), "--eval_retriever", str(tmp_path / "retriever"),
                          "--out_dir", str(tmp_path / "rft"), "--report_to", "tensorboard"])
    for run in ("sft", "rft"):
        want, got = numbers(tmp_path / run / "metrics.jsonl"), events(tmp_path / run)
        assert len(want) > 20 and got.keys() == want.keys(), run
        assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-30) for k, v in want.items()), run  # float32 events

"""tools/reliability.py: how a try's outcome is sorted (clear error, handled, unclear error, traceback,
silent or lossy) and that a script run in-process gives its exit status and output, traceback included.
The tries themselves run with `python tools/reliability.py` (docs/TRAINING.md, "Reliability")."""
from tools import reliability


def test_outcomes_are_sorted_by_status_output_and_files():
    stop = reliability.Try("x", [], ("--lr nan",))
    assert reliability.outcome(stop, 1, "train_sft.py: --lr nan: not a finite number") == "clear error"
    assert reliability.outcome(stop, 1, "something else") == "unclear error"
    assert reliability.outcome(stop, 0, "--lr nan") == "silent or lossy"  # ran on where it must stop
    assert reliability.outcome(stop, 1, "Traceback (most recent call last):\n ... --lr nan") == "traceback"
    # files damaged
    assert reliability.outcome(reliability.Try("x", [], ("said",), check=lambda: False), 1, "said") == "silent or lossy"
    run_on = reliability.Try("x", [], ("resuming from step-000002",), stops=False, check=lambda: True)
    assert reliability.outcome(run_on, 0, "resume: ... resuming from step-000002") == "handled"
    assert reliability.outcome(run_on, 0, "resumed, saying nothing") == "silent or lossy"
    assert reliability.outcome(reliability.Try("x", [], ("ok",), stops=False, check=lambda: False), 0,
                               "ok") == "silent or lossy"


def test_scripts_run_in_process_with_their_status_and_traceback(tmp_path):
    code, text = reliability.run_script(["retrieval.py", "--lr", "nan", "--out_dir", str(tmp_path)])
    assert code == 1 and "--lr nan: not a finite number" in text and "Traceback" not in text
    bad = tmp_path / "bad.py"
    bad.write_text("raise KeyError('boom')\n")
    code, text = reliability.run_script([str(bad)])
    assert code == 1 and "Traceback (most recent call last)" in text and "KeyError: 'boom'" in text

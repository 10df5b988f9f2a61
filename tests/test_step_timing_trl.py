"""tools/step_timing_trl.py: TRL reads the prompts as ours, and one tiny step a side gives the table and the ratio.
Skipped without the optional install (pip install --no-deps -r requirements-trl.txt)."""
import pytest

pytest.importorskip("trl")

from tools import step_timing_trl  # noqa: E402
import data  # noqa: E402
import posebench  # noqa: E402

CFG = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
ARGS = step_timing_trl.Args(batch_size=2, group_size=2, max_new_tokens=4, steps=1, warmup=0)


def test_trl_reads_the_prompt_ids_ours_reads():
    tok, samples = step_timing_trl.prompts(ARGS, CFG)
    assert {s.task for s in samples} == {"text_to_pose"} and len(samples) == ARGS.batch_size
    ours = data.collate(samples, tok, 1, add_answer=False, pad_side="left")
    theirs = tok(text=[step_timing_trl.trl_prompt(tok, s) for s in samples])["input_ids"]  # as GRPOTrainer calls it
    for row, mask, ids in zip(ours.input_ids, ours.attention_mask, theirs):
        assert row[mask.bool()].tolist() == ids


def test_one_step_a_side():
    tok, samples = step_timing_trl.prompts(ARGS, CFG)
    rows = step_timing_trl.side_by_side(tok, samples, ARGS)
    for side, r in rows.items():
        assert len(r) == 1, side
        parts = [r[0][p] for p in step_timing_trl.PARTS]
        assert min(parts) >= 0 and 0 < sum(parts) <= r[0]["total"], (side, r)
        assert 1 <= r[0]["length"] <= ARGS.max_new_tokens, (side, r)
    lines = step_timing_trl.table(rows, ARGS).splitlines()
    assert lines[2].startswith("TRL GRPOTrainer") and lines[3].startswith("ours")
    assert lines[-1].startswith("ours / TRL = ") and float(lines[-1].split("= ")[1]) > 0

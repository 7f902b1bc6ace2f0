"""metrics.jsonl read while it is written, and after a kill cut its last record short.

CI once failed here: tests/test_slurm.py polled a live job's metrics.jsonl and read a record the job was still
writing (json: "Unterminated string"). Readers take complete lines only; the logger drops a cut-short last
record when a run starts on the directory again, so the resumed run's first record is not joined to it.
"""

from __future__ import annotations

import json

import pytest

from megatron_pz.train.metrics import MetricsLogger, drop_torn_tail, read_live_jsonl, read_metrics


def record(step: int, **extra) -> str:
    return json.dumps({"phase": "rl", "step": step, "loss": 0.5 * step, **extra}) + "\n"


def test_a_record_being_written_is_not_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = record(1) + record(2)
    path.write_text(whole + record(3)[:37])  # step 3 half written, as a reader polling a live run can see it
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    path.write_text(whole + record(3))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    path.write_text(whole + "\n")
    assert [r["step"] for r in read_live_jsonl(path)] == [1, 2]  # a blank line is no record


def test_a_broken_complete_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(record(1) + record(2)[:20] + "\n" + record(3))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("tail", [0, 37, 70_000, 200_000])
def test_drop_torn_tail_cuts_back_to_the_last_newline(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(record(step, note="x" * 1000) for step in range(1, 101))  # ~100 KB: more than one 64 KiB read
    torn = ("y" * tail)
    path.write_text(whole + torn)
    assert drop_torn_tail(path) == tail
    assert path.read_text() == whole
    assert drop_torn_tail(path) == 0


def test_drop_torn_tail_without_any_newline_and_without_a_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    assert drop_torn_tail(path) == 0 and not path.exists()
    path.write_text('{"step": 1, "resp')
    assert drop_torn_tail(path) == 17
    assert path.read_text() == ""


def test_a_resumed_logger_drops_the_cut_short_record_before_it_appends(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(record(1) + record(2) + record(3)[:30])  # killed while writing step 3
    (tmp_path / "samples.jsonl").write_text('{"step": 2, "role": "predictor", "response": "Par')
    (tmp_path / "eval_samples.jsonl").write_text('{"step": 0}\n')
    logger = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    out = capsys.readouterr().out
    assert "metrics.jsonl: dropped a last record cut short by an earlier stop (30 bytes" in out
    assert "samples.jsonl: dropped a last record cut short by an earlier stop (49 bytes" in out
    assert "eval_samples.jsonl" not in out  # ended in its newline: untouched
    logger.log(3, {"loss": 1.5})  # the resumed run writes step 3 again
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert (tmp_path / "samples.jsonl").read_text() == ""
    assert (tmp_path / "eval_samples.jsonl").read_text() == '{"step": 0}\n'


def test_a_logger_that_does_not_write_leaves_the_files_alone(tmp_path):
    """Only the writing rank repairs: another rank's logger must not cut a record rank 0 is writing."""
    torn = record(1) + record(2)[:10]
    (tmp_path / "metrics.jsonl").write_text(torn)
    MetricsLogger(tmp_path, tensorboard=False, enabled=False)
    assert (tmp_path / "metrics.jsonl").read_text() == torn

"""Checkpoints: atomic publish, exact resume of model + distributed optimizer at DP=2, TP resharding."""

from __future__ import annotations

import pytest

from megatron_pz.checkpoint import (
    LATEST_FILE, META_FILE, CheckpointError, latest_checkpoint, resolve_checkpoint_dir,
)
from multiproc import run_torchrun


@pytest.mark.slow
def test_resume_atomicity_and_reshard(tmp_path):
    """In one 2-rank run (see the worker): save at step 2 with a distributed optimizer (DP=2), an extra
    teacher model, scheduler, RNG and per-rank state; a save of step 3 killed before its rename leaves
    step 2 as latest and its temp dir unloadable; a freshly built actor resumes to identical params,
    Adam state, LR and RNG, and its next step equals the uninterrupted run's; the TP=1 checkpoint loads
    at TP=2 with identical full weights."""
    out = run_torchrun("ckpt_resume.py", str(tmp_path), nproc=2, timeout=300)
    assert "CKPT OK" in out


def test_latest_checkpoint_none_and_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / LATEST_FILE).write_text("banana")
    with pytest.raises(CheckpointError, match="should hold a step number"):
        latest_checkpoint(tmp_path)
    (tmp_path / LATEST_FILE).write_text("5")
    with pytest.raises(CheckpointError, match="iter_0000005 is missing or incomplete"):
        latest_checkpoint(tmp_path)
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / META_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000005"
    # the marker alone is not a checkpoint: loading checks every file (tests/test_bad_input.py has real ones)
    with pytest.raises(CheckpointError, match=r"iter_0000005 is damaged \(metadata.json missing; .metadata missing; "
                                              r"common.pt missing\); it holds no complete checkpoint"):
        resolve_checkpoint_dir(tmp_path)


def test_unfinished_dirs_are_refused(tmp_path):
    partial = tmp_path / "iter_0000007"
    partial.mkdir()
    (partial / "metadata.json").write_text("{}")  # dist_checkpointing wrote, our marker did not
    with pytest.raises(CheckpointError, match="did not finish"):
        resolve_checkpoint_dir(partial)
    tmp = tmp_path / ".tmp_iter_0000008"
    tmp.mkdir()
    (tmp / META_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="temporary directory"):
        resolve_checkpoint_dir(tmp)
    with pytest.raises(CheckpointError, match="nothing: does not exist"):
        resolve_checkpoint_dir(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint root"):
        resolve_checkpoint_dir(tmp_path / "empty")


@pytest.mark.slow
def test_bf16_actor_keeps_loaded_weights_through_its_first_step(tmp_path):
    """A bf16 run from an imported checkpoint trained the random init: the optimizer's fp32 main params were
    never refreshed from the loaded weights, and the first step wrote them back (issue 27, SmolLM2)."""
    out = run_torchrun("bf16_init_weights.py", str(tmp_path), nproc=1, timeout=300)
    assert "BF16_INIT_OK" in out, out[-3000:]

"""Bad input never costs a run (issue 28): every probe a user can make of the CLI, and the run it must not cost.

The table runs each probe the way a user types it (``megatron-pz ...``, here :func:`megatron_pz.cli.main` in this
process: refusals happen before any process group exists, so nothing of a run starts) against a copy of one real
run directory with two RL checkpoints, and checks: the exit code (2: refused before any work), one line
``megatron-pz COMMAND: error: ...`` naming the file or key, no traceback, and the run directory byte for byte as
it was. Probes marked ``found`` are the issue's "Found" list (each failed on the code before it). ``train
--check`` probes show what a resume does with a damaged checkpoint without running it; the runs below do run it,
on two ranks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch.distributed as dist

from multiproc import REPO_ROOT, WORKERS, kill_tree, run_torchrun, start_torchrun
from test_trainer import CONFIG, TINY

from megatron_pz.cli import main
from megatron_pz.train.metrics import read_metrics

# (the table imports nothing else of the project, so it runs against the code before issue 28 too)
REFUSED = 2  # megatron_pz.errors.EXIT_BAD_INPUT

RUN = [*TINY, "warm_start.enabled=false", "train.save_interval=1", "train.keep_last=0"]
ITER1, ITER2 = "checkpoints/iter_0000001", "checkpoints/iter_0000002"


@dataclass
class Made:
    """Built once per module: a run with RL checkpoints at steps 1 and 2 (1 rank, the tiny model, the embedded
    default data), data built with another tokenizer (vocabulary 512: it fits the model's 1024, so only the
    tokenizers themselves differ) and a Hugging Face model folder."""

    run: Path
    cache: Path
    data: Path
    other_data: Path
    hf: Path


@pytest.fixture(scope="module")
def made(tmp_path_factory, pz_data_cache) -> Made:
    from megatron_pz.data.default import ensure_default_dataset
    from megatron_pz.data.preprocess import preprocess
    from megatron_pz.data.sample import gensim_wiki_sample
    from megatron_pz.data.tokenizer import train_bpe_tokenizer
    from megatron_pz.data.tokenizer_corpus import article_texts
    from workers.convert_models import write_hf_folder

    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    result = subprocess.run([sys.executable, str(WORKERS / "train_cli.py"), "train", CONFIG, *RUN, "train.steps=2",
                             f"data.default_cache_dir={pz_data_cache}", f"train.run_dir={run}"],
                            capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, env=plain_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    sample = gensim_wiki_sample()
    tokenizer = train_bpe_tokenizer(article_texts([sample], max_pages=30), 512, root / "bpe512")
    other = root / "data512"
    preprocess([sample], other, tokenizer, workers=1, progress=False, max_pages=30, fit_pages=30,
               punkt_chars=100_000, passage_tokens=64, max_passage_tokens=1024, min_passage_tokens=32)
    write_hf_folder("qwen3", root / "hf")
    data = ensure_default_dataset(pz_data_cache, 1024, 64)  # the run's data: built by it, returned as is
    return Made(run, pz_data_cache, data, other, root / "hf")


def plain_env() -> dict:
    """This environment as a fresh shell has it: no world of an earlier in-process test (RANK, MASTER_PORT...)."""
    world = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in world}, "PYTHONPATH": str(REPO_ROOT)}


@dataclass
class Ctx:
    """One probe's copies: ``run`` (of the module's run), ``data`` (of its data, made on first use)."""

    made: Made
    tmp: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    @property
    def data(self) -> Path:
        copy = self.tmp / "data"
        if not copy.exists():
            shutil.copytree(self.made.data, copy)
        return copy

    def train(self, *overrides: str) -> list[str]:
        return ["train", CONFIG, *RUN, "train.steps=3", f"data.default_cache_dir={self.made.cache}",
                f"train.run_dir={self.run}", *overrides]

    def check(self, *overrides: str) -> list[str]:
        return [*self.train(*overrides), "--check"]

    def fmt(self, text: str) -> str:
        return text.format(run=self.run, data=self.tmp / "data", tmp=self.tmp,
                           other=self.made.other_data if self.made else None)


@dataclass
class Probe:
    id: str
    argv: Callable[[Ctx], list[str]]
    needles: tuple[str, ...]  # in the error line (exit 2) or in stdout (exit 0); {run}, {data}, {tmp} filled in
    damage: Callable[[Ctx], object] = lambda ctx: None
    code: int = REFUSED
    found: bool = False  # an item of the "Found" list
    run_dir: bool = True  # needs the module's run (slow to build); False: a fresh run_dir, never created

    def param(self):
        return pytest.param(self, id=self.id, marks=[pytest.mark.slow] if self.run_dir else [])


def cut(path: Path, nbytes: int = 0) -> None:
    """Cut ``nbytes`` off the end of ``path`` (0: half of it)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - nbytes] if nbytes else data[: len(data) // 2])


def pointer(ctx: Ctx, text) -> None:
    latest = ctx.run / "checkpoints" / "latest_checkpointed_iteration.txt"
    latest.unlink() if text is None else latest.write_text(text)


def fresh(*overrides: str) -> Callable[[Ctx], list[str]]:
    """A new run (its run_dir must never appear); the embedded default's cache in the probe's folder."""
    return lambda ctx: ["train", CONFIG, *RUN, f"data.default_cache_dir={ctx.tmp / 'cache'}", *overrides,
                        f"train.run_dir={ctx.tmp / 'new'}"]


def export(ctx: Ctx, *args: str) -> list[str]:
    return ["convert", "megatron-to-hf", *args]


PROBES = [
    # -- config: refused before the data, the model or the run directory are touched
    Probe("config-lr-negative", fresh("optimizer.lr=-1"), ("optimizer.lr must be >= 0",), found=True, run_dir=False),
    Probe("config-beta1", fresh("optimizer.adam_beta1=1.5"), ("optimizer.adam_beta1",), run_dir=False),
    Probe("config-eps", fresh("optimizer.adam_eps=-1"), ("optimizer.adam_eps",), run_dir=False),
    Probe("config-clip-grad", fresh("optimizer.clip_grad=-1"), ("optimizer.clip_grad", "0 turns clipping off"),
          run_dir=False),
    Probe("config-min-lr-above-lr", fresh("optimizer.min_lr=1"), ("optimizer.min_lr",), run_dir=False),
    Probe("config-warm-start-steps", fresh("warm_start.steps=0"), ("warm_start.steps",), run_dir=False),
    Probe("config-warm-start-lr", fresh("warm_start.lr=-3"), ("warm_start.lr",), run_dir=False),
    Probe("config-heldout-fraction", fresh("data.heldout_fraction=1.5"), ("data.heldout_fraction",), run_dir=False),
    Probe("config-temperature", fresh("objective.predictor_temperature=0"), ("objective.predictor_temperature",),
          run_dir=False),
    Probe("config-unknown-key", fresh("train.stepz=3"), ("'stepz'", "section 'train'"), run_dir=False),
    # -- plan: numbers that describe no machine
    Probe("plan-gpu-memory-negative", lambda ctx: ["plan", CONFIG, "--gpu-memory-gib", "-5"], ("--gpu-memory-gib",),
          found=True, run_dir=False),
    Probe("plan-gpu-memory-zero", lambda ctx: ["plan", CONFIG, "--gpu-memory-gib", "0"], ("--gpu-memory-gib",),
          found=True, run_dir=False),
    Probe("plan-nodes-zero", lambda ctx: ["plan", CONFIG, "--nodes", "0"], ("--nodes",), run_dir=False),
    Probe("plan-margin", lambda ctx: ["plan", CONFIG, "--min-margin", "1.5"], ("--min-margin",), run_dir=False),
    # -- data
    Probe("data-path-missing", lambda ctx: ctx.train(f"data.path={ctx.tmp / 'nope'}"),
          ("data.path", "{tmp}/nope: no such folder"), found=True),
    Probe("data-manifest-deleted", lambda ctx: ctx.train(f"data.path={ctx.data}"), ("{data}/manifest.json: missing",),
          damage=lambda ctx: (ctx.data / "manifest.json").unlink()),
    Probe("data-idx-deleted", lambda ctx: ctx.train(f"data.path={ctx.data}"), ("{data}/passages.idx: missing",),
          damage=lambda ctx: (ctx.data / "passages.idx").unlink(), found=True),
    Probe("data-bin-cut-in-half", lambda ctx: ctx.train(f"data.path={ctx.data}"),
          ("{data}/passages.bin: ", "but passages.idx describes"), damage=lambda ctx: cut(ctx.data / "passages.bin"),
          found=True),
    Probe("data-bin-2-bytes-short", lambda ctx: ctx.train(f"data.path={ctx.data}"),
          ("{data}/passages.bin: ", "but passages.idx describes"),
          damage=lambda ctx: cut(ctx.data / "passages.bin", 2), found=True),
    Probe("data-words-idx-cut", lambda ctx: ctx.train(f"data.path={ctx.data}"), ("{data}/words.idx",),
          damage=lambda ctx: cut(ctx.data / "words.idx", 100)),
    Probe("data-text-shard-cut", lambda ctx: ctx.train(f"data.path={ctx.data}"),
          ("{data}/text/shard-000000.jsonl: ", "manifest says"),
          damage=lambda ctx: cut(ctx.data / "text" / "shard-000000.jsonl", 10)),
    # -- checkpoint / data / model: the three agree
    Probe("init-checkpoint-missing", fresh("warm_start.enabled=false", "train.init_checkpoint=/nonexistent/ckpt"),
          ("train.init_checkpoint=/nonexistent/ckpt does not exist",), found=True, run_dir=False),
    Probe("init-checkpoint-other-tokenizer",
          lambda ctx: fresh(f"train.init_checkpoint={ctx.run / ITER1}", f"data.path={ctx.made.other_data}")(ctx),
          ("train.init_checkpoint", "the tokenizer of {run}/checkpoints/iter_0000001 (1024 tokens)",
           "{other} was built with (512 tokens"), found=True),
    Probe("resume-other-tokenizer-data", lambda ctx: ctx.train(f"data.path={ctx.made.other_data}"),
          ("train.run_dir=", "the tokenizer of {run}/checkpoints/iter_0000002"), found=True),
    Probe("resume-model-shape-changed", lambda ctx: ctx.train("model.architecture.intermediate_size=256"),
          ("intermediate_size 128 (checkpoint) vs 256 (config)", "{run}/checkpoints/iter_0000002"), found=True),
    Probe("resume-optimizer-layout-changed", lambda ctx: ctx.train("optimizer.use_distributed_optimizer=false"),
          ("optimizer.use_distributed_optimizer=false", "holds a distributed optimizer's state"), found=True),
    Probe("resume-objective-needs-teacher", lambda ctx: ctx.train("objective.name=rlp", "objective.rlp_group=2"),
          ("RLP needs its EMA teacher", "iter_0000002"),),
    Probe("resume-false-over-checkpoints", lambda ctx: ctx.train("train.resume=false"),
          ("train.resume=false", "{run}/checkpoints holds this run's checkpoints (up to step 2)"),),
    Probe("run-dir-is-a-file", lambda ctx: fresh()(ctx)[:-1] + [f"train.run_dir={ctx.run / 'metrics.jsonl'}"],
          ("train.run_dir={run}/metrics.jsonl is a file",)),
    Probe("resume-damaged-fallback-refused", lambda ctx: ctx.train("train.resume_fallback=false"),
          ("{run}/checkpoints/iter_0000002 is damaged (shard __0_1.distcp is", "train.resume_fallback=false"),
          damage=lambda ctx: cut(ctx.run / ITER2 / "__0_1.distcp", 1000)),
    Probe("resume-nothing-complete", lambda ctx: ctx.train(), ("no complete checkpoint is left",),
          damage=lambda ctx: [(ctx.run / d / ".metadata").unlink() for d in (ITER1, ITER2)]),
    # -- resume past a damaged latest checkpoint: what `train` would do (exit 0, the runs below do it)
    *[Probe(f"resume-{name}", lambda ctx: ctx.check(),
            (f"resume: would skip {{run}}/{ITER2} ({why}); to be kept as {{run}}/checkpoints/damaged_iter_0000002",
             f"start: resume from {{run}}/{ITER1}"), damage=damage, code=0, found=True)
      for name, damage, why in [
          ("truncated-shard", lambda ctx: cut(ctx.run / ITER2 / "__0_1.distcp", 1000),
           "shard __0_1.distcp is 1418425 bytes, .metadata places 1419425 in it"),
          ("dot-metadata-deleted", lambda ctx: (ctx.run / ITER2 / ".metadata").unlink(), ".metadata missing"),
          ("metadata-json-deleted", lambda ctx: (ctx.run / ITER2 / "metadata.json").unlink(), "metadata.json missing"),
          ("pz-checkpoint-json-deleted", lambda ctx: (ctx.run / ITER2 / "pz_checkpoint.json").unlink(),
           "no pz_checkpoint.json: the save that wrote it did not finish"),
      ]],
    *[Probe(f"resume-pointer-{name}", lambda ctx: ctx.check(),
            (f"resume: {{run}}/checkpoints/latest_checkpointed_iteration.txt {why}", f"start: resume from {{run}}/{ITER2}"),
            damage=damage, code=0, found=found)
      for name, damage, why, found in [
          ("garbage", lambda ctx: pointer(ctx, "two"), "holds 'two', not a step number", True),
          ("missing-step", lambda ctx: pointer(ctx, "7"), "names step 7, but iter_0000007 is not there", True),
          # before: a fresh start that overwrote the run's checkpoints
          ("deleted", lambda ctx: pointer(ctx, None), "is missing, although 2 checkpoint folder(s) are there", False),
      ]],
    # -- convert never destroys
    Probe("export-out-is-the-run", lambda ctx: export(ctx, "--ckpt", str(ctx.run / "checkpoints"), "--out",
                                                      str(ctx.run), "--overwrite"),
          ("--out {run} and --ckpt {run}/checkpoints overlap",), found=True),
    Probe("export-out-inside-ckpt", lambda ctx: export(ctx, "--ckpt", str(ctx.run / "checkpoints"), "--out",
                                                       str(ctx.run / "checkpoints" / "hf")), ("overlap",)),
    Probe("export-overwrite-foreign-files", lambda ctx: export(ctx, "--ckpt", str(ctx.run / "checkpoints"), "--out",
                                                               str(ctx.run / "notes"), "--overwrite"),
          ("--overwrite replaces only a previous export", "{run}/notes also holds plan.txt"),
          damage=lambda ctx: ((ctx.run / "notes").mkdir(), (ctx.run / "notes" / "plan.txt").write_text("mine"),
                              (ctx.run / "notes" / "config.json").write_text("{}"))),
    Probe("export-ckpt-missing", lambda ctx: export(ctx, "--ckpt", str(ctx.tmp / "nope"), "--out", str(ctx.tmp / "hf")),
          ("--ckpt {tmp}/nope does not exist",), found=True, run_dir=False),
    Probe("export-latest-damaged", lambda ctx: export(ctx, "--ckpt", str(ctx.run / "checkpoints"), "--out",
                                                      str(ctx.tmp / "hf")),
          ("{run}/checkpoints/iter_0000002 is damaged (.metadata missing)",
           "the newest complete one is {run}/checkpoints/iter_0000001"),
          damage=lambda ctx: (ctx.run / ITER2 / ".metadata").unlink()),
    Probe("import-into-run-checkpoints", lambda ctx: ["convert", "hf-to-megatron", "--hf", str(ctx.made.hf), "--out",
                                                      str(ctx.run / "checkpoints")],
          ("--out {run}/checkpoints holds a run's checkpoints (up to step 2)", "--into-existing"), found=True),
    Probe("import-into-run-dir", lambda ctx: ["convert", "hf-to-megatron", "--hf", str(ctx.made.hf), "--out", str(ctx.run)],
          ("--out {run} is not empty and not a checkpoint folder",)),
    Probe("import-hf-missing", lambda ctx: ["convert", "hf-to-megatron", "--hf", str(ctx.tmp / "nope"), "--out",
                                            str(ctx.tmp / "init")], ("--hf {tmp}/nope does not exist",), run_dir=False),
    # -- eval
    Probe("eval-model-missing", lambda ctx: ["eval", "--model", str(ctx.tmp / "nope"), "--tasks", "x", "--output",
                                             str(ctx.tmp / "out.json")], ("--model {tmp}/nope",), run_dir=False),
]


def tree(root: Path) -> dict:
    """Every file and folder under ``root`` with the SHA-256 of its bytes (None: a folder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def same_process():
    """The probes run in this process: they must leave no process group and no signal handler behind."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    initialized = dist.is_initialized()
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    assert dist.is_initialized() == initialized, "a refused command started a process group"


@pytest.mark.parametrize("probe", [p.param() for p in PROBES])
def test_bad_input(probe: Probe, request, tmp_path, capsys, same_process):
    made = request.getfixturevalue("made") if probe.run_dir else None
    ctx = Ctx(made, tmp_path)
    if probe.run_dir:
        shutil.copytree(made.run, ctx.run)
    probe.damage(ctx)
    before = tree(tmp_path)
    code = main(probe.argv(ctx))
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, err[-3000:]
    command = probe.argv(ctx)[0]
    errors = [line for line in err.splitlines() if line.startswith("megatron-pz ")]
    if probe.code:
        assert code == probe.code, (code, err[-3000:])
        assert len(errors) == 1 and errors[0].startswith(f"megatron-pz {command}: error: "), err[-3000:]
        where = errors[0]
    else:
        assert code == 0 and not errors, err[-3000:]
        where = out
    for needle in probe.needles:
        assert ctx.fmt(needle) in where, (ctx.fmt(needle), where)
    assert tree(tmp_path) == before  # refused (or only checked): nothing written, nothing moved, nothing deleted


# ----------------------------------------------------------------- the boundary itself


def test_a_bug_gets_its_traceback_and_a_line_asking_to_report_it(capsys):
    from megatron_pz.errors import EXIT_FAILED, guarded

    def boom():
        raise KeyError("inner")

    assert guarded("train", boom) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'inner'" in err
    assert err.strip().splitlines()[-1].startswith("megatron-pz train: internal error: the traceback above is a bug")


def test_our_errors_are_one_line_with_where_and_what_to_do(capsys, monkeypatch):
    from megatron_pz.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, PzError, during_work, guarded

    def refuse():
        raise BadInput("holds 'two', not a step number", path="/r/latest", remedy="write the step")

    def fail():
        with during_work():  # the same type, after work started: a failure, exit 1
            refuse()

    assert guarded("convert", refuse) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "megatron-pz convert: error: /r/latest: holds 'two', not a step number; write the step\n"
    assert guarded("convert", fail) == EXIT_FAILED
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert guarded("train", refuse) == EXIT_BAD_INPUT  # the same on every rank: the node's first rank says it
    assert guarded("train", fail) == EXIT_FAILED  # possibly this rank's own: said here
    assert capsys.readouterr().err.count("megatron-pz train: error:") == 1
    monkeypatch.setenv("MEGATRON_PZ_TRACEBACK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert guarded("train", refuse) == EXIT_BAD_INPUT and "Traceback" in capsys.readouterr().err
    assert issubclass(BadInput, PzError)


def test_the_latest_pointer_never_moves_backwards(tmp_path):
    """A save of an older step (an import of step 0 into a run's checkpoints with --into-existing) is written
    but does not become the latest."""
    from megatron_pz import checkpoint
    from megatron_pz.convert.targets import check_import_target
    from megatron_pz.errors import BadInput

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / checkpoint.LATEST_FILE).write_text("2")
    for step in (0, 3):
        tmp = root / f".tmp_{checkpoint.iter_dir_name(step)}"
        tmp.mkdir()
        checkpoint._publish(root, tmp, root / checkpoint.iter_dir_name(step), step)
        assert (root / checkpoint.iter_dir_name(step)).is_dir()
    assert (root / checkpoint.LATEST_FILE).read_text() == "3"  # 0 left it at 2, 3 moved it
    hf = tmp_path / "hf"
    hf.mkdir()
    check_import_target(hf, root, into_existing=True)  # allowed with the flag; refused without (the table)
    with pytest.raises(BadInput, match="up to step 3"):
        check_import_target(hf, root, into_existing=False)


def test_overwrite_replaces_a_previous_export_and_only_its_files(tmp_path):
    from megatron_pz.convert.targets import check_export_target, remove_previous_export
    from megatron_pz.errors import BadInput

    ckpt, out = tmp_path / "run" / "checkpoints", tmp_path / "hf"
    ckpt.mkdir(parents=True)
    out.mkdir()
    written = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    for name in written:
        (out / name).write_text("x")
    with pytest.raises(BadInput, match="pass --overwrite"):
        check_export_target(ckpt, out, overwrite=False)
    check_export_target(ckpt, out, overwrite=True)  # a previous export: replaced
    remove_previous_export(out)
    assert not out.exists()
    out.mkdir()
    (out / "config.json").write_text("x")
    (out / "README.md").write_text("mine")
    with pytest.raises(BadInput, match=r"also holds README\.md \(not written by the converter\)"):
        check_export_target(ckpt, out, overwrite=True)
    with pytest.raises(OSError):  # and if it appears between the check and the replace, it stays
        remove_previous_export(out)
    assert (out / "README.md").read_text() == "mine"


# ----------------------------------------------------------------- several ranks


@pytest.mark.slow
def test_two_ranks_resume_from_the_same_checkpoint_past_a_damaged_one(made, tmp_path):
    """2 ranks (DP=2) on a run whose latest checkpoint lost a shard's tail: both skip it, resume from step 1
    (said once), train steps 2-3; the damaged folder is kept, byte for byte, as damaged_iter_0000002."""
    run = tmp_path / "run"
    shutil.copytree(made.run, run)
    cut(run / ITER2 / "__0_1.distcp", 1000)
    damaged = tree(run / ITER2)
    proc = start_torchrun(WORKERS / "train_cli.py", *Ctx(made, tmp_path).train(), nproc=2, launcher=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    assert proc.returncode == 0, out[-8000:]
    assert out.count(f"resume: skipped {run / ITER2} (shard __0_1.distcp is 1418425 bytes, .metadata places "
                     f"1419425 in it); kept as {run}/checkpoints/damaged_iter_0000002") == 1, out[-8000:]
    assert out.count(f"resumed from {run / ITER1} at step 1") == 1
    assert tree(run / "checkpoints" / "damaged_iter_0000002") == damaged
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"
    rl = read_metrics(run)
    assert [r["step"] for r in rl if r["phase"] == "rl"] == [1, 2, 2, 3]  # step 2 again, then 3


@pytest.mark.slow
def test_two_ranks_agree_when_they_see_a_checkpoint_differently(made, tmp_path):
    """Rank 1's view of the shared file system lacks a shard of the newest checkpoint, rank 0's does not:
    both take the newest one that every rank finds complete, and rank 0 says which rank skipped what."""
    shutil.copytree(made.run / "checkpoints", tmp_path / "checkpoints")
    out = run_torchrun("resume_agreement.py", str(tmp_path / "checkpoints"), nproc=2, timeout=300)
    assert "AGREED" in out


@pytest.mark.slow
def test_bad_input_on_two_ranks_is_one_line(tmp_path):
    """Under the launcher every rank refuses, one line says why (not one per rank, no traceback, no torch
    failure summary), and the job exits 2."""
    proc = start_torchrun(WORKERS / "train_cli.py", "train", CONFIG, *RUN, f"train.run_dir={tmp_path / 'run'}",
                          f"data.path={tmp_path / 'nope'}", nproc=2, launcher=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REFUSED, out[-6000:]
    assert out.count("megatron-pz train: error: data.path: ") == 1, out[-6000:]
    assert "Traceback" not in out and "Root Cause" not in out
    assert "launcher: the run was refused before any work (exit 2)" in out
    assert not (tmp_path / "run").exists()

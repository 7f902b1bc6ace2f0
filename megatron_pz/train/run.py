"""A training run's setup: the run (config, data, tokenizer, logger, lock), the policy it trains (resumed,
warm-started or fresh) and its RL checkpoints.

:class:`Run` checks everything that can be checked without work (HF config, parallel sizes, rollout engine,
memory plan) before it starts the process group and takes the run directory's lock; :class:`Policy` builds
the actor (and RLP's EMA teacher) and loads the newest RL checkpoint, else the warm start's (run once,
:func:`warm_start`), else ``train.init_checkpoint``; :class:`Checkpoints` writes the RL checkpoints the loop
(:mod:`megatron_pz.train.trainer`) asks for, pruned to ``train.keep_last`` (:func:`prune_checkpoints`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist

from megatron_pz.checkpoint import iter_dir_name, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_pz.config import ConfigError, OptimizerConfig, num_experts_of, validate_parallel_sizes
from megatron_pz.data.dataset import train_and_heldout
from megatron_pz.data.default import resolve_data_path
from megatron_pz.data.tokenizer import load_tokenizer
from megatron_pz.disagg.roles import job_world_size
from megatron_pz.memory_plan import check_at_startup
from megatron_pz.model.provider import resolve_hf_config
from megatron_pz.rl.ema import EmaTeacher
from megatron_pz.rollout.config import check_engine_for_model, engine_captures_routes, resolve_routing_replay
from megatron_pz.run_config import RunConfig
from megatron_pz.runtime import initialize
from megatron_pz.runtime.distributed import resolve_device
from megatron_pz.runtime.run_lock import acquire_on_rank0
from megatron_pz.train.actor import Actor, build_model_chunks
from megatron_pz.train.metrics import MetricsLogger
from megatron_pz.train.preflight import preflight, settle
from megatron_pz.train.warm_start import run_warm_start


def check_vocab(hf, tokenizer) -> None:
    if len(tokenizer) > hf.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{hf.vocab_size} (model.hf_config / model.architecture)")


def _data_on_rank0_first(cfg: RunConfig):
    """Build the embedded default dataset once (rank 0), then every rank opens it."""
    path = resolve_data_path(cfg.data) if dist.get_rank() == 0 else None
    holder = [str(path) if path else None]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


class Run:
    """Everything a training run holds; built once, used by warm start, RL loop and eval."""

    def __init__(self, cfg: RunConfig, start=None):
        """``start``: :func:`megatron_pz.train.preflight.preflight`'s answer when the caller has it already."""
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        # Everything that can be checked without work is checked before any work starts.
        self.hf_config = resolve_hf_config(cfg)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the training ranks (the job's first ranks, disaggregated)
        if cfg.runtime.world_size and cfg.runtime.world_size != job_world_size():
            raise ConfigError(f"runtime.world_size={cfg.runtime.world_size} but {job_world_size()} ranks were launched")
        validate_parallel_sizes(cfg.parallel, self.hf_config, world)
        check_engine_for_model(cfg.rollout, self.hf_config)
        device_type = resolve_device(cfg.runtime.device).type
        self.routing_replay = resolve_routing_replay(cfg.rollout, self.hf_config, device_type)  # "r3" | "off"
        # MoE rollouts carry their routes wherever the engine can record them (replayed under r3, compared
        # with the training forward's own routing either way)
        self.capture_routes = bool(num_experts_of(self.hf_config)) and engine_captures_routes(cfg.rollout, device_type)
        check_at_startup(cfg, self.hf_config, world, device_type,
                         rank=int(os.environ.get("RANK", "0")))  # refuses an unfit plan before any model is built
        self.start = start or preflight(cfg, self.hf_config)  # data, the start checkpoint, and that they agree
        self.info = initialize(cfg.parallel, cfg.runtime)
        self.run_dir = Path(cfg.train.run_dir)
        self.lock = acquire_on_rank0(self.run_dir)  # one writer per run dir, before anything is written
        self.data_path = _data_on_rank0_first(cfg)
        self.start = settle(self.start, cfg, self.hf_config, self.data_path)  # every rank: the same checkpoint
        self.dataset, self.heldout = train_and_heldout(self.data_path, cfg.data)
        self.tokenizer = load_tokenizer(self.dataset.tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        check_vocab(self.hf_config, self.tokenizer)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.warm_root = self.run_dir / "warm_start"
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard)
        self.engine = None  # the rollout engine, once the RL loop builds it (closed by close())

    def max_sequence_length(self) -> int:
        longest_response = max(max(o.generator_max_tokens, o.predictor_max_tokens, o.ntr_max_tokens,
                                   o.rlp_thought_max_tokens + 2) for o in self.cfg.objective.leaves())
        return self.cfg.train.max_prompt_tokens + longest_response + 8

    def build_actor(self, opt_cfg, total_steps: int, routing_replay: str = "off"):
        return Actor(self.hf_config, self.cfg.model, self.cfg.parallel, opt_cfg, self.info.device,
                     total_steps=total_steps, max_sequence_length=self.max_sequence_length(),
                     routing_replay=routing_replay)

    def save(self, root, step, actor, teacher=None, extra_state=None, with_optimizer=True, rng_state=None):
        return save_checkpoint(root, step, actor.chunks, optimizer=actor.optimizer if with_optimizer else None,
                               scheduler=actor.scheduler if with_optimizer else None,
                               extra_models={"ema": teacher} if teacher else None, extra_state=extra_state,
                               hf_config=self.hf_config, tokenizer_dir=self.dataset.tokenizer_dir,
                               rng_state=rng_state)

    def close(self) -> None:
        """End of a run, stopped or not: the engine's own resources (vLLM), the logger, the run lock."""
        close_engine(self.engine)
        self.logger.close()
        if self.lock is not None:
            self.lock.release()


def close_engine(engine) -> None:
    """Shut down an engine that holds resources of its own (vLLM), so a next run in this process can build one."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints under ``root`` (0: all); rank 0 deletes the rest."""
    if keep_last <= 0 or dist.get_rank() != 0:
        return
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def warm_start(run: Run, stop=None) -> Optional[Path]:
    """Run (or reuse) the warm start; returns the checkpoint RL starts from. A stop agreed between two
    of its steps abandons it (``Stopped``): it is short, and the next job runs it again."""
    done = latest_checkpoint(run.warm_root)
    if done is not None:
        return done
    ws = run.cfg.warm_start
    opt = OptimizerConfig(lr=ws.lr, min_lr=ws.min_lr, lr_schedule="cosine", warmup_steps=ws.warmup_steps,
                          weight_decay=0.01, adam_beta2=0.98, clip_grad=1.0,
                          use_distributed_optimizer=run.cfg.optimizer.use_distributed_optimizer)
    actor = run.build_actor(opt, total_steps=ws.steps)
    if run.cfg.train.init_checkpoint:  # a format warm start of a pretrained model (else: from scratch)
        actor.load_weights(run.cfg.train.init_checkpoint)
    summary = run_warm_start(actor, run.dataset, run.tokenizer, run.cfg, run.logger, run.dp_rank, run.dp_size,
                             run.pad_id, stop=stop)
    run.logger.log(ws.steps, summary, phase="warm_start")
    path = run.save(run.warm_root, ws.steps, actor, with_optimizer=False, extra_state={"summary": summary})
    del actor
    return path


def usable_passages(run: Run) -> list[int]:
    """Passages whose longest prompt fits ``train.max_prompt_tokens`` (the rest are counted, not used)."""
    limit = run.cfg.train.max_prompt_tokens - 200  # room for the longest instruction template
    # lengths straight from the IndexedDataset's index: no passage is decoded at start-up
    lengths = run.dataset.tokens.sequence_lengths[[run.dataset.document_index(i) for i in range(len(run.dataset))]]
    usable = [int(i) for i in np.flatnonzero(lengths <= limit)]
    skipped = len(run.dataset) - len(usable)
    if skipped and dist.get_rank() == 0:
        print(f"data: {skipped} of {len(run.dataset)} training passages exceed the prompt budget "
              f"(train.max_prompt_tokens={run.cfg.train.max_prompt_tokens}) and are skipped", flush=True)
    return usable


class Policy:
    """The actor (+ RLP's EMA teacher) a run trains, and the checkpoint state it resumed from (None: fresh)."""

    def __init__(self, run: Run, stop):
        cfg, t = run.cfg, run.cfg.train
        self.resumed_from = run.start.resume.path if run.start.resume else None  # checked, agreed (Run)
        start_weights = None
        if self.resumed_from is None:
            if cfg.warm_start.enabled:
                start_weights = warm_start(run, stop)
            elif t.init_checkpoint:
                start_weights = Path(t.init_checkpoint)
        # one scheduler step per optimizer step: grpo.epochs x grpo.mini_batches per RL step
        self.actor = run.build_actor(cfg.optimizer, total_steps=t.steps * cfg.grpo.mini_batches * cfg.grpo.epochs,
                                     routing_replay=run.routing_replay)
        self.teacher = None
        if cfg.objective.uses_rlp():  # the EMA teacher only when some phase / component is RLP
            self.teacher = build_model_chunks(run.hf_config, cfg.model, cfg.parallel, run.info.device,
                                              run.max_sequence_length())
            for chunk in self.teacher:
                chunk.requires_grad_(False)
        self.ema = EmaTeacher(self.teacher, tau=cfg.objective.ema_tau) if self.teacher else None
        self.state: Optional[dict] = None
        if self.resumed_from is not None:
            self.state = load_checkpoint(self.resumed_from, self.actor.chunks, self.actor.optimizer,
                                         self.actor.scheduler,
                                         extra_models={"ema": self.teacher} if self.teacher else None)
            if self.ema is not None:
                self.ema.initialized = bool(self.state.get("ema_initialized", True))
            if dist.get_rank() == 0:
                print(f"resumed from {self.resumed_from} at step {self.state['step']}", flush=True)
        elif start_weights is not None:
            self.actor.load_weights(start_weights)  # and the optimizer's main params from them
        if self.ema is not None and not self.ema.initialized:
            self.ema.initialize_from(self.actor.chunks)

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state else 0


class Checkpoints:
    """The RL checkpoints of a run: the policy (actor, optimizer, scheduler, EMA teacher) with what the batch
    source stores beside it (its data position, a batch in flight), pruned to ``train.keep_last``."""

    def __init__(self, run: Run, policy: Policy):
        self.run, self.policy = run, policy
        self.saved_step = policy.step  # the step of the newest checkpoint on disk

    def path(self, step: int) -> str:
        return str(self.run.ckpt_root / iter_dir_name(step))

    def save(self, step: int, source_state: Callable[[], dict], rng_state: Optional[dict] = None) -> float:
        """Save step ``step``; ``source_state()`` (called first: a disaggregated source waits for its batch in
        flight there) gives the batch source's state, ``rng_state`` the RNG streams to resume with (default:
        the current ones). Returns the seconds it took."""
        start = time.perf_counter()
        policy = self.policy
        extra = {**source_state(), "ema_initialized": bool(policy.ema and policy.ema.initialized)}
        self.run.save(self.run.ckpt_root, step, policy.actor, policy.teacher, extra_state=extra, rng_state=rng_state)
        prune_checkpoints(self.run.ckpt_root, self.run.cfg.train.keep_last)
        self.saved_step = step
        return time.perf_counter() - start

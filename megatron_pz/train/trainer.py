"""The RL loop: passages -> objective rollouts and rewards -> one GRPO update -> metrics/checkpoints.

Read top to bottom, :func:`train` is the algorithm's schedule; parallelism lives in
:class:`~megatron_pz.train.actor.Actor`, rollouts in :mod:`megatron_pz.rollout`, the objective in
:mod:`megatron_pz.objectives`, the loss in :mod:`megatron_pz.rl.grpo`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_pz.config import ConfigError, num_experts_of, validate_parallel_sizes
from megatron_pz.train.batching import TokenSequence, padding_fraction
from megatron_pz.train.config import RunConfig


# ------------------------------------------------------------------ pieces of one step


def experiences_to_sequences(experiences, loss_weights=None, route_shape=None,
                             require_routes: bool = False) -> list[TokenSequence]:
    """Prompt + response rows; the loss covers response tokens only, each carrying its advantage,
    its sampling temperature (log-probs are taken at it) and, if given, its aggregation weight
    (``loss_weights[i]`` for ``experiences[i]``, see :func:`megatron_pz.rl.grpo.aggregation_weights`).

    MoE (``route_shape`` set): each row carries its rollout routes, checked first (an error names the
    experience); ``require_routes`` (routing replay on) refuses a trainable experience without them."""
    rows = []
    for i, e in enumerate(experiences):
        if not e.trainable or not e.response_ids:
            continue
        p, r = len(e.prompt_ids), len(e.response_ids)
        tokens = list(e.prompt_ids) + list(e.response_ids)
        per_token = {"advantages": [0.0] * p + [float(e.advantage or 0.0)] * r,
                     "temperature": [float(e.temperature)] * (p + r),
                     # the rollout correction's: tokens it rejected (out of the loss mask), weight-version lags
                     "rejected": [0.0] * p + [float(x) for x in (e.rejected or [0.0] * r)],
                     "lag": [0.0] * p + [float(x) for x in (e.lag if isinstance(e.lag, list) else [e.lag] * r)]}
        if e.rollout_logprobs is not None:
            per_token["rollout_logprobs"] = [0.0] * p + [float(x) for x in e.rollout_logprobs]
        if loss_weights is not None:
            per_token["loss_weight"] = [0.0] * p + [float(loss_weights[i])] * r
        mask = [0.0] * p + ([float(x) for x in e.token_mask] if e.token_mask is not None else [1.0] * r)
        rows.append(TokenSequence(tokens, mask, per_token, index=i,
                                  routes=_experience_routes(e, i, route_shape, require_routes)))
    return rows


def _experience_routes(e, i: int, route_shape, required: bool):
    from megatron_pz.rollout.routes import check_routes

    where = f"experience {i} (role {e.role}, group {e.group})"
    if e.routes is None:
        if required:
            raise ValueError(f"{where}: routing replay is on but the experience carries no MoE routes "
                             "(its rollout engine did not capture them)")
        return None
    if route_shape is None:
        raise ValueError(f"{where}: carries MoE routes but the model is dense")
    return check_routes(e.routes, route_shape, len(e.prompt_ids) + len(e.response_ids) - 1, where)


def update_loss_weights(experiences, dp_group=None) -> list[float]:
    """Aggregation weight of each experience for one optimizer step over ``experiences`` (this rank's
    share), from its tags (``component``, ``loss_agg``, ``mix_weight``); every component's token and
    sample counts are summed over the data-parallel group first."""
    from megatron_pz.rl.grpo import aggregation_weights

    lengths = [(len(e.response_ids) if e.token_mask is None else int(sum(e.token_mask))) if e.trainable else 0
               for e in experiences]  # tokens in the loss: rejected ones leave the counts
    labels = sorted({e.component for e in experiences})
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        gathered: list = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(gathered, labels, group=dp_group)
        labels = sorted({label for ls in gathered for label in ls})
    counts = torch.zeros(2 * len(labels), dtype=torch.float64)
    for e, n in zip(experiences, lengths):
        k = labels.index(e.component)
        counts[2 * k] += n
        counts[2 * k + 1] += float(n > 0)
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    totals = {label: (counts[2 * k].item(), counts[2 * k + 1].item()) for k, label in enumerate(labels)}
    return aggregation_weights(lengths, [e.component for e in experiences],
                               {e.component: e.loss_agg for e in experiences},
                               {e.component: e.mix_weight for e in experiences},
                               totals, sum(t for t, _ in totals.values()))


def make_grpo_loss_fn(grpo_cfg):
    """Adapts :func:`megatron_pz.rl.grpo.grpo_loss` to the actor's micro-batches (vocab-parallel).

    Log-probs are taken at each row's sampling temperature; ``old_logprobs`` come from the batch when
    the update computed them (PPO mini-batches / epochs), else they equal the current ones (ratio 1).
    """
    from megatron_pz.rl.grpo import grpo_loss
    from megatron_pz.rl.logprobs import vocab_parallel_entropy
    from megatron_pz.rl.rollout_correction import COUNTER_PREFIX, RolloutCorrection
    from megatron_pz.train.losses import token_logprobs_at_temperature

    correction = RolloutCorrection(grpo_cfg.rollout_correction)

    def loss_fn(mb, logits):
        logp = token_logprobs_at_temperature(mb, logits)
        old = mb.per_token.get("old_logprobs", logp.detach())
        with torch.no_grad():
            entropy = torch.nn.functional.pad(vocab_parallel_entropy(logits[:, :-1].float()), (1, 0))
        rollout = mb.per_token.get("rollout_logprobs")
        loss_sum, num_tokens, metrics = grpo_loss(
            # a rank with nothing to train on runs one fully masked batch without per-token fields
            logp, old, mb.per_token.get("advantages", torch.zeros_like(mb.loss_mask)), mb.loss_mask,
            clip_low=grpo_cfg.clip_low, clip_high=grpo_cfg.clip_high,
            rollout_logprobs=rollout, correction=correction, rejected=mb.per_token.get("rejected"),
            token_lags=mb.per_token.get("lag"), kl_coef=0.0, entropy=entropy, dual_clip=grpo_cfg.dual_clip,
            token_weights=mb.per_token.get("loss_weight"))
        n = float(num_tokens)
        counters = {k: v for k, v in metrics.items() if k.startswith(COUNTER_PREFIX)}  # the correction's: sums already
        sums = {f"{k}_sum": v * n for k, v in metrics.items()
                if not k.endswith("_max") and k != "num_tokens" and k not in counters}
        sums.update(counters, loss_sum=loss_sum.detach(), num_tokens=num_tokens.detach())
        return loss_sum, num_tokens.to(torch.int), sums

    return loss_fn


def grpo_update(actor, experiences, grpo_cfg, loss_fn, max_tokens: int, pad_id: int, dp_group=None):
    """One rollout batch's policy update: ``grpo.epochs`` passes over ``grpo.mini_batches`` optimizer
    steps. With more than one step, old log-probs are computed once before the first (at each row's
    temperature), so every later step sees a live ratio and the clip can engage. The same pass runs when the
    rollout correction rejects: its decision is taken there, before any token is counted
    (:func:`megatron_pz.rl.rollout_correction.reject_before_update`).

    MoE: every forward carries the experiences' rollout routes (replayed under R3, see
    :mod:`megatron_pz.train.routing_replay`); routing agreement is measured on the first pass over the
    batch, at the rollout's weights (the old-log-prob pass, or the single optimizer step).

    Returns (summed loss metrics of all steps, the last StepResult, every micro-batch trained on).
    """
    import contextlib

    from megatron_pz.rl.rollout_correction import reject_before_update
    from megatron_pz.train.losses import token_logprobs_at_temperature

    routing = getattr(actor, "routing", None)
    routes = dict(route_shape=getattr(actor, "route_shape", None), require_routes=bool(routing and routing.replay))

    def measured(first: bool):
        return routing.measuring() if first and routing is not None else contextlib.nullcontext()

    n_mini, epochs = grpo_cfg.mini_batches, grpo_cfg.epochs
    correction = grpo_cfg.rollout_correction
    old, passed = None, n_mini * epochs > 1 or bool(correction.reject)
    if passed:  # the trainer's log-probs at the start of the update: PPO's old ones, the rejection's pi_T
        rows = experiences_to_sequences(experiences, **routes)
        batches = actor.micro_batches(rows, max_tokens, pad_id)
        with measured(True):
            values = actor.forward_values(batches, token_logprobs_at_temperature)
        start = {}
        for mb, vals in zip(batches, values):
            for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
                if idx >= 0:
                    start[idx] = vals[r, :length].tolist()
        experiences = reject_before_update(experiences, start, correction)  # before any token is counted
        old = start if n_mini * epochs > 1 else None  # one step: its own forward has these log-probs
    # strided slices of this rank's experiences (every n-th): one optimizer step each, so each
    # mini-batch holds samples of every role / mixture component
    summed: dict[str, float] = {}
    result, all_batches = None, []
    for _ in range(epochs):
        for k in range(n_mini):
            part = list(range(k, len(experiences), n_mini))
            mine = [experiences[i] for i in part]
            weights = update_loss_weights(mine, dp_group)
            rows = experiences_to_sequences(mine, weights, **routes)
            if old is not None:
                for row in rows:
                    row.per_token["old_logprobs"] = old[part[row.index]]
            batches = actor.micro_batches(rows, max_tokens, pad_id)
            with measured(not passed):
                result = actor.train_step(batches, loss_fn)
            all_batches += batches
            for key, value in result.metrics.items():
                summed[key] = summed.get(key, 0.0) + value
    return summed, result, all_batches


def step_metrics(metrics: dict, experiences, batches, summed: dict, result, seconds: float, dp_size: int,
                 actor=None) -> dict:
    """A step's metrics: the objective's and the loop's (averaged over ranks), the update's, MoE routing
    agreement (beside ``rollout/logp_diff_mean``, the train-vs-rollout log-prob gap), and throughput
    (rollout tokens of every replica + trained tokens, over the step's ``seconds``)."""
    from megatron_pz.rl.rollout_correction import correction_metrics
    from megatron_pz.train.metrics import mean_over_ranks

    metrics.update(padding_fraction=padding_fraction(batches),
                   rollout_tokens=float(sum(len(e.response_ids) for e in experiences)))
    metrics = mean_over_ranks(metrics)
    metrics.update(token_means(summed), lr=result.lr, grad_norm=result.grad_norm)
    metrics.update(correction_metrics(summed))  # rollout_corr/...: mismatch, truncation, rejection per lag
    agreement = actor.routing.take_agreement() if actor is not None and actor.routing is not None else None
    if agreement is not None:
        metrics["rollout/routing_agreement"] = agreement
    metrics["tokens_per_s"] = (metrics["rollout_tokens"] * dp_size + summed.get("num_tokens", 0.0)) / max(seconds, 1e-9)
    return metrics


def token_means(summed: dict[str, float]) -> dict[str, float]:
    n = max(1.0, summed.get("num_tokens", 0.0))
    out = {k[:-4]: v / n for k, v in summed.items() if k.endswith("_sum")}
    out["loss"] = out.pop("loss", 0.0)
    out["train_tokens"] = summed.get("num_tokens", 0.0)
    return out


# ------------------------------------------------------------------ setup


def resolve_hf_config(cfg: RunConfig):
    from megatron_pz.model import load_hf_config

    source = cfg.model.hf_config or dict(cfg.model.architecture)
    hf = load_hf_config(source, cfg.model.hf_overrides)
    if cfg.model.hf_config and cfg.model.architecture:  # the YAML states the shapes it was sized for
        for key, expected in cfg.model.architecture.items():
            actual = getattr(hf, key, None)
            if key != "model_type" and actual != expected and not (key == "num_experts" and
                                                                    getattr(hf, "num_local_experts", None) == expected):
                raise ConfigError(f"model.architecture.{key}={expected!r} but {cfg.model.hf_config} has {actual!r}")
    return hf


def check_vocab(hf, tokenizer) -> None:
    if len(tokenizer) > hf.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{hf.vocab_size} (model.hf_config / model.architecture)")


def _data_on_rank0_first(cfg: RunConfig):
    """Build the embedded default dataset once (rank 0), then every rank opens it."""
    from megatron_pz.data.default import resolve_data_path

    path = resolve_data_path(cfg.data) if dist.get_rank() == 0 else None
    holder = [str(path) if path else None]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


class Run:
    """Everything a training run holds; built once, used by warm start, RL loop and eval."""

    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        from megatron_pz.data.dataset import train_and_heldout
        from megatron_pz.data.tokenizer import load_tokenizer
        from megatron_pz.runtime import initialize

        self.cfg = cfg
        # Everything that can be checked without work is checked before any work starts.
        self.hf_config = resolve_hf_config(cfg)
        from megatron_pz.runtime.roles import job_world_size

        world = int(os.environ.get("WORLD_SIZE", "1"))  # the training ranks (the job's first ranks, disaggregated)
        if cfg.runtime.world_size and cfg.runtime.world_size != job_world_size():
            raise ConfigError(f"runtime.world_size={cfg.runtime.world_size} but {job_world_size()} ranks were launched")
        validate_parallel_sizes(cfg.parallel, self.hf_config, world)
        from megatron_pz.memory_plan import check_at_startup
        from megatron_pz.rollout.config import check_engine_for_model, engine_captures_routes, resolve_routing_replay
        from megatron_pz.runtime.distributed import resolve_device

        check_engine_for_model(cfg.rollout, self.hf_config)
        device_type = resolve_device(cfg.runtime.device).type
        self.routing_replay = resolve_routing_replay(cfg.rollout, self.hf_config, device_type)  # "r3" | "off"
        # MoE rollouts carry their routes wherever the engine can record them (replayed under r3, compared
        # with the training forward's own routing either way)
        self.capture_routes = bool(num_experts_of(self.hf_config)) and engine_captures_routes(cfg.rollout, device_type)
        check_at_startup(cfg, self.hf_config, world, device_type,
                         rank=int(os.environ.get("RANK", "0")))  # refuses an unfit plan before any model is built
        self.info = initialize(cfg.parallel, cfg.runtime)
        from megatron_pz.runtime.run_lock import acquire_on_rank0

        self.run_dir = Path(cfg.train.run_dir)
        self.lock = acquire_on_rank0(self.run_dir)  # one writer per run dir, before anything is written
        self.data_path = _data_on_rank0_first(cfg)
        self.dataset, self.heldout = train_and_heldout(self.data_path, cfg.data)
        self.tokenizer = load_tokenizer(self.dataset.tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        check_vocab(self.hf_config, self.tokenizer)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.warm_root = self.run_dir / "warm_start"
        from megatron_pz.train.metrics import MetricsLogger

        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard)
        self.engine = None  # the rollout engine, once the RL loop builds it (closed by close())

    def max_sequence_length(self) -> int:
        longest_response = max(max(o.generator_max_tokens, o.predictor_max_tokens, o.ntr_max_tokens,
                                   o.rlp_thought_max_tokens + 2) for o in self.cfg.objective.leaves())
        return self.cfg.train.max_prompt_tokens + longest_response + 8

    def build_actor(self, opt_cfg, total_steps: int, routing_replay: str = "off"):
        from megatron_pz.train.actor import Actor

        return Actor(self.hf_config, self.cfg.model, self.cfg.parallel, opt_cfg, self.info.device,
                     total_steps=total_steps, max_sequence_length=self.max_sequence_length(),
                     routing_replay=routing_replay)

    def save(self, root, step, actor, teacher=None, extra_state=None, with_optimizer=True, rng_state=None):
        from megatron_pz.checkpoint import save_checkpoint

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


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0 or dist.get_rank() != 0:
        return
    import shutil

    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def warm_start(run: Run, stop=None) -> Optional[Path]:
    """Run (or reuse) the warm start; returns the checkpoint RL starts from. A stop agreed between two
    of its steps abandons it (``Stopped``): it is short, and the next job runs it again."""
    from megatron_pz.checkpoint import latest_checkpoint
    from megatron_pz.config import OptimizerConfig
    from megatron_pz.train.warm_start import run_warm_start

    done = latest_checkpoint(run.warm_root)
    if done is not None:
        return done
    ws = run.cfg.warm_start
    opt = OptimizerConfig(lr=ws.lr, min_lr=ws.min_lr, lr_schedule="cosine", warmup_steps=ws.warmup_steps,
                          weight_decay=0.01, adam_beta2=0.98, clip_grad=1.0,
                          use_distributed_optimizer=run.cfg.optimizer.use_distributed_optimizer)
    actor = run.build_actor(opt, total_steps=ws.steps)
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
        from megatron_pz.checkpoint import latest_checkpoint, load_checkpoint
        from megatron_pz.rl.ema import EmaTeacher
        from megatron_pz.train.actor import build_model_chunks

        cfg, t = run.cfg, run.cfg.train
        self.resumed_from = latest_checkpoint(run.ckpt_root) if t.resume else None
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
            load_checkpoint(start_weights, self.actor.chunks, restore_rng=False)
        if self.ema is not None and not self.ema.initialized:
            self.ema.initialize_from(self.actor.chunks)

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state else 0


def rewind_for_batch_in_flight(sampler, state: dict) -> None:
    """A disaggregated run's checkpoint may hold a batch in flight (passages drawn, not trained yet). Resumed
    colocated, those passages are drawn again and generated on-policy rather than skipped."""
    pending = state.get("rollout_batch")
    if pending:
        sampler.consumed -= len(pending["passages"])
        if dist.get_rank() == 0:
            print(f"resume: the checkpoint's batch in flight (step {pending['step'] + 1}) is generated again here, "
                  "from the current weights", flush=True)


def train(cfg: RunConfig) -> dict:
    """Warm start (if configured), then the RL loop; resumes from ``run_dir/checkpoints``.

    A stop signal (:mod:`megatron_pz.runtime.preemption`) is agreed across ranks after the rollout of a
    step (the step is abandoned: its update has not started, so the state it started from is saved) and
    after its update (the step is finished and saved); the result then has ``stopped`` set.
    """
    from megatron_pz.runtime.preemption import install_stop_signals

    stop = install_stop_signals()  # before any work: SIGUSR1's default action ends a process
    if cfg.rollout.disaggregated:  # rollouts on their own ranks: megatron_pz/train/async_loop.py
        from megatron_pz.train.async_loop import train_disaggregated

        return train_disaggregated(cfg, stop)
    run = Run(cfg)
    return until_stopped(run, lambda: _train(run, stop))


def until_stopped(run: Run, loop) -> dict:
    """``loop()``'s result, or after a :class:`~megatron_pz.runtime.preemption.Stopped` the stop record (rank 0)
    and a result that says so; the run is closed either way (engine, logger, lock)."""
    from megatron_pz.runtime.preemption import Stopped, write_stop_record

    try:
        return loop()
    except Stopped as stopped:
        if dist.get_rank() == 0:
            write_stop_record(run.run_dir, stopped.signal, stopped.step, stopped.checkpoint, stopped.abandoned,
                              stopped.save_seconds)
            print(f"stopped on {stopped.describe()}; resubmit to continue", flush=True)
        dist.barrier()  # the record is written before any rank exits
        return {"before": None, "after": None, "step": stopped.step, "stopped": stopped.signal.name}
    finally:
        run.close()


def _train(run: Run, stop) -> dict:
    from megatron_pz.checkpoint import capture_rng_state, iter_dir_name
    from megatron_pz.objectives.composite import build_training_objective
    from megatron_pz.rollout.budget import rollout_context_length
    from megatron_pz.rollout.factory import build_rollout_engine
    from megatron_pz.rollout.phase import RolloutPhases
    from megatron_pz.train.evaluate import build_eval_items, evaluate
    from megatron_pz.train.sampler import PassageSampler
    from megatron_pz.train.scorer import MegatronScorer
    from megatron_pz.runtime.preemption import Stopped, clear_stop_record, stop_if_agreed

    cfg = run.cfg
    if dist.get_rank() == 0:
        clear_stop_record(run.run_dir)
    stop_if_agreed(stop, "before the run started")
    t = cfg.train
    policy = Policy(run, stop)
    actor, teacher, ema, step, resume_from = policy.actor, policy.teacher, policy.ema, policy.step, policy.resumed_from
    saved_step = step
    sampler = PassageSampler(run.dataset, t.passages_per_step, run.dp_rank, run.dp_size, cfg.runtime.seed,
                             usable=usable_passages(run))
    if policy.state is not None:
        sampler.load_state_dict(policy.state["sampler"])
        rewind_for_batch_in_flight(sampler, policy.state)

    engine = run.engine = build_rollout_engine(cfg.rollout, actor.chunks, run.tokenizer, run.hf_config,
                                               max_model_len=rollout_context_length(cfg),
                                               capture_routes=run.capture_routes)
    phases = RolloutPhases(engine, actor, refresh=cfg.rollout.refresh_weights)  # wake, sync, generate, sleep
    objective = build_training_objective(cfg.objective, run.tokenizer)
    scorer = MegatronScorer(actor, teacher, run.pad_id, t.max_tokens_per_micro_batch)
    loss_fn = make_grpo_loss_fn(cfg.grpo)
    from megatron.core import parallel_state as ps

    dp_group = ps.get_data_parallel_group()

    eval_items = build_eval_items(run.heldout, cfg)

    def run_eval(at_step):
        metrics, samples = evaluate(phases, run.tokenizer, run.heldout, eval_items, cfg, run.dp_rank, run.dp_size)
        run.logger.log(at_step, metrics, phase="eval")
        run.logger.log_eval_samples(at_step, samples)
        return metrics

    def save(at_step, sampler_state, rng_state=None) -> float:
        t_save = time.perf_counter()
        extra = {"sampler": sampler_state, "ema_initialized": bool(ema and ema.initialized)}
        run.save(run.ckpt_root, at_step, actor, teacher, extra_state=extra, rng_state=rng_state)
        _prune(run.ckpt_root, t.keep_last)
        return time.perf_counter() - t_save

    before = None
    if resume_from is None:  # no RL state to save before the first step
        stop_if_agreed(stop, "before the evaluation before RL")
        before = run_eval(step)
    stop_if_agreed(stop, "before the first RL step")
    last_metrics: dict = {}
    while step < t.steps:
        t0 = time.perf_counter()
        start_state = sampler.state_dict(), capture_rng_state()  # what a step abandoned below resumes from
        passages = sampler.next_batch()
        with phases.generating() as rollout_engine:
            experiences, metrics = objective.collect(passages, rollout_engine, scorer, step)
        t1 = time.perf_counter()
        sig = stop.agreed()
        if sig:  # abandon this step: nothing has changed but the data position and the RNG streams
            # saved already when a checkpoint of this step is on disk (at step 0: RL starts over next time)
            seconds = save(step, *start_state) if step != saved_step else 0.0
            raise Stopped(sig, step, str(run.ckpt_root / iter_dir_name(step)) if step else None, True, seconds,
                          where=f"in the rollout of step {step + 1} (abandoned)")
        # the engine is asleep; one or more optimizer steps (grpo.mini_batches x grpo.epochs)
        summed, result, batches = grpo_update(actor, experiences, cfg.grpo, loss_fn, t.max_tokens_per_micro_batch,
                                              run.pad_id, dp_group)
        actor.finish_param_sync()  # overlap_param_gather: the EMA and the next weight sync read fresh values
        phases.weights_updated()
        if ema is not None:
            ema.update(actor.chunks)
        t2 = time.perf_counter()
        step += 1
        metrics.update({"rollout/weight_syncs": float(phases.syncs), "time/rollout_s": t1 - t0, "time/train_s": t2 - t1})
        metrics = step_metrics(metrics, experiences, batches, summed, result, t2 - t0, run.dp_size, actor)
        last_metrics = metrics
        if step % t.log_interval == 0 or step == t.steps:
            run.logger.log(step, metrics)
            run.logger.log_samples(step, experiences, run.tokenizer, t.log_samples)
        sig = stop.agreed()
        if step % t.save_interval == 0 or step == t.steps or sig:
            seconds = save(step, sampler.state_dict())
            saved_step = step
        if sig:  # the step is finished and saved
            raise Stopped(sig, step, str(run.ckpt_root / iter_dir_name(step)), False, seconds,
                          where=f"in step {step}")
        if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
            run_eval(step)
    after = run_eval(step)
    return {"before": before, "after": after, "last": last_metrics, "step": step}

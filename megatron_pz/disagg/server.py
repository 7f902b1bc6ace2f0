"""What a rollout rank does for the whole run (``rollout.placement: disaggregated``).

It holds one engine with its own weights (``hf`` or vLLM; no Megatron model is ever built here), waits for
training rank 0's messages (:mod:`megatron_pz.disagg.protocol`) and answers them:

* ``PushWeights``: receive the whole model from every pipeline stage's head and load it into the engine;
* ``Generate``: run the rollout half of the objective (:func:`megatron_pz.objectives.split.generate`) on
  this rank's units of the step's passages, with the weights the message names, and send the drafts back.
  For PretrainZero that is everything (both stages, their text rewards); for RLP the thoughts;
* ``Evaluate``: this rank's slice of the held-out evaluation, greedy, as colocated runs do it;
* ``Stop``: return.

Waiting for a message can last a whole update; it watches training rank 0's heartbeat meanwhile, and any
error here is published in the store before it propagates, so the trainers fail naming this rank.
SIGTERM / SIGUSR1 are left to the trainers (they drain the batch in flight, save, and send ``Stop``).
"""

from __future__ import annotations

import signal
import time

import torch

from megatron_pz.data.dataset import train_and_heldout
from megatron_pz.data.tokenizer import load_tokenizer
from megatron_pz.disagg.bridge import connect_rollout_side, receive_weights
from megatron_pz.disagg.protocol import (Evaluate, Evaluated, Generate, Generated, Hello, PushWeights, Stop,
                                         WorkSplit)
from megatron_pz.disagg.roles import Roles
from megatron_pz.eval.heldout import build_eval_items, generate_eval
from megatron_pz.memory_plan import check_at_startup
from megatron_pz.model.provider import resolve_hf_config
from megatron_pz.objectives import split as objective_split
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.rollout.budget import rollout_context_length
from megatron_pz.rollout.factory import build_own_weights_engine
from megatron_pz.runtime.distributed import resolve_device


class RolloutRank:
    """One rollout rank's end of the bridge: its stage groups, message doorbells and the engine."""

    def __init__(self, cfg, roles: Roles):
        self.cfg, self.roles = cfg, roles
        self.index = roles.rank
        self.device = resolve_device(cfg.runtime.device)
        self.trainer = roles.trainer_peer(0)
        self.received = 0  # messages taken from training rank 0
        self.groups = connect_rollout_side(roles, cfg.parallel.pp, cfg.rollout.bridge_timeout_s, self.device)
        self.version = None
        self.last_push = None

    def receive(self):
        self.received += 1
        self.roles.liveness.wait_for_count(f"pz/ctl/{self.index}", self.received, [self.trainer])
        return self.groups[0].recv_object(0)

    def send(self, message) -> None:
        self.roles.store.add(f"pz/out/{self.index}", 1)
        self.groups[0].send_object(message, 0)

    def load_weights(self, engine, message: PushWeights) -> None:
        start = time.perf_counter()
        engine.load_weight_buckets(receive_weights(self.groups))
        stats = engine.last_sync
        self.version = message.version
        self.last_push = {"seconds": time.perf_counter() - start, "bytes": float(sum(stats.bucket_bytes)),
                          "buckets": float(len(stats.bucket_bytes))}


def serve(cfg, roles: Roles) -> dict:
    """The life of a rollout rank; returns when training rank 0 says stop. Errors are published first."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: print(f"rollout rank {roles.rank}: stop signal noted; the training ranks "
                                            "drain the batch in flight and stop this rank", flush=True))
    with roles.reporting_errors():
        return serve_messages(cfg, roles)


def serve_messages(cfg, roles: Roles) -> dict:
    """Answer training rank 0's messages until it says stop."""
    me = RolloutRank(cfg, roles)
    hello = me.receive()
    if not isinstance(hello, Hello):
        raise RuntimeError(f"rollout rank {me.index}: expected Hello first, got {type(hello).__name__}")
    hf_config = resolve_hf_config(cfg)
    check_at_startup(cfg, hf_config, roles.world, me.device.type, rank=roles.rank, rollout_rank=True)
    tokenizer = load_tokenizer(hello.tokenizer_dir)
    dataset, heldout = train_and_heldout(hello.data_path, cfg.data)
    work = WorkSplit(cfg.train.passages_per_step, roles.rollout_ranks, hello.dp_size)
    engine = build_own_weights_engine(cfg.rollout, tokenizer, hf_config, getattr(torch, hello.dtype), me.device,
                                      rollout_context_length(cfg))
    engine.wake()  # its own device: awake for the whole run
    objective = build_training_objective(cfg.objective, tokenizer)
    eval_items = None
    while True:
        message = me.receive()
        if isinstance(message, PushWeights):
            me.load_weights(engine, message)
        elif isinstance(message, Generate):
            if message.version != me.version:
                raise RuntimeError(f"asked to generate step {message.step} with weights v{message.version}, "
                                   f"this rollout rank holds v{me.version}")
            start = time.perf_counter()
            drafts = {}
            for unit in work.units_of_worker(me.index):
                passages = [dataset[i] for i in message.passages[work.unit_slice(unit)]]
                drafts[unit] = objective_split.generate(objective, passages, engine, message.step)
            engine.finish_phase()
            me.send(Generated(message.step, me.version, me.index, drafts, time.perf_counter() - start, me.last_push))
            me.last_push = None
        elif isinstance(message, Evaluate):
            if message.version != me.version:
                raise RuntimeError(f"asked to evaluate with weights v{message.version}, this rollout rank holds "
                                   f"v{me.version}")
            start = time.perf_counter()
            eval_items = eval_items or build_eval_items(heldout, cfg)
            totals, samples = generate_eval(engine, tokenizer, heldout, eval_items, cfg, me.index,
                                            roles.rollout_ranks)
            engine.finish_phase()
            me.send(Evaluated(totals, samples, time.perf_counter() - start))
        elif isinstance(message, Stop):  # "stopped": the signal's name when a stop signal ended the run (exit 75)
            return {"role": "rollout", "stopped": message.signal, "reason": message.reason}
        else:
            raise RuntimeError(f"rollout rank {me.index}: unexpected message {type(message).__name__}")

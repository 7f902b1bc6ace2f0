"""What MoE routing replay (R3) stores: the rollout's routes on the host, the replay targets on the device.

* Host: every experience of a step keeps its routes until the update (``Experience.routes``,
  :mod:`megatron_pz.model.routes`): ``tokens x MoE layers x top-k`` ids of 1 byte (<= 256 experts) or 2,
  on every rank of the model-parallel group. Counted for the step's worst case: each sample of this
  rank's passages at the run's longest sequence.
* Device: per micro-batch and local MoE router, ``[router tokens, top-k]`` int64 targets
  (:class:`megatron_pz.train.routing_replay.RoutingReplay`), kept while the micro-batch is in flight when
  activation recompute re-runs the routers (``RouterReplay.replay_backward_list``), else only during its
  forward.
"""

from __future__ import annotations

import math

from megatron_pz.memory_plan.activations import Term, stage_layer_indices
from megatron_pz.memory_plan.model_state import Layout, Shapes


def samples_per_passage(leaf) -> int:
    """Experiences one passage yields under a single objective config (the objectives' group sizes)."""
    if leaf.name == "pretrainzero":  # G_gen generations, each valid mask predicted G_pred times
        return leaf.generator_group * (1 + leaf.predictor_group)
    if leaf.name == "random_rlpt":
        return leaf.predictor_group
    if leaf.name == "rlp":
        return leaf.rlp_group
    return leaf.ntr_group


def routing_replay_terms(cfg, s: Shapes, lay: Layout, stage: int, tokens: int, seq: int, recompute_routers: bool
                         ) -> tuple[list[Term], list[Term]]:
    """(device terms of one training micro-batch, host terms) of R3; empty for a dense model."""
    moe_layers = sum(s.moe_layers)
    if not moe_layers:
        return [], []
    id_bytes = 1 if s.experts <= 256 else 2
    per_passage = max(samples_per_passage(leaf) for leaf in cfg.objective.leaves())
    samples = math.ceil(cfg.train.passages_per_step / lay.dp) * per_passage
    host = [Term(f"MoE routes of one step's experiences ({samples} samples x {seq} tokens, worst case)",
                 samples * seq * moe_layers * s.topk * id_bytes, "train.passages_per_step")]
    stage_moe_layers = sum(s.moe_layers[i] for i in stage_layer_indices(s, lay, stage))
    router_tokens = tokens / lay.cp / (lay.tp if lay.sequence_parallel else 1)
    in_flight = (lay.pp - stage) if recompute_routers else 1
    device = [Term("routing replay targets (int64 expert ids, micro-batches in flight)",
                   in_flight * router_tokens * stage_moe_layers * s.topk * 8, "rollout.routing_replay")]
    return device, host

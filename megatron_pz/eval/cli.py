"""``megatron-pz eval``: lm-eval tasks and/or held-out mask-prediction accuracy on an exported HF folder."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_pz.data.dataset import check_dataset
from megatron_pz.eval.mask_accuracy import SPAN_SOURCES


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate an exported Hugging Face model (lm-eval, mask accuracy)")
    p.add_argument("--model", required=True, help="Hugging Face folder (from `convert megatron-to-hf`)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (e.g. gsm8k,mmlu_pro)")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or fraction if < 1)")
    p.add_argument("--batch-size", default="1")
    p.add_argument("--mask-accuracy", action="store_true", help="also run the held-out mask-prediction eval")
    p.add_argument("--data", default=None, help="preprocessed passages folder (for --mask-accuracy)")
    p.add_argument("--heldout-fraction", type=float, default=0.02)
    p.add_argument("--max-passages", type=int, default=100)
    p.add_argument("--spans-per-passage", type=int, default=1)
    p.add_argument("--spans", choices=SPAN_SOURCES, default="candidates",
                   help="mask the preprocessor's span candidates (content words) or any valid single word")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--normalize", action="store_true", help="normalised instead of exact match")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-config", default=None,
                   help="a run's YAML: evaluate the folder on that run's held-out items and figures (train.eval_passages, "
                        "the eval: section) through plain transformers; --output then gets one JSON record per item")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --run-config")
    p.add_argument("--compare", default=None,
                   help="with --run-config: records of an earlier evaluation (a JSONL from --output, or a run's "
                        "eval_samples.jsonl[@step]); prints the before/after table with paired 95 %% intervals")
    p.add_argument("--output", required=True, help="results JSON path (with --run-config: the item records, JSONL)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    # lazy: `megatron-pz --help` imports every subcommand's module; the work's own imports wait for the command
    from megatron_pz.config import ConfigError  # lazy: see above
    from megatron_pz.eval.lm_eval_runner import run_lm_eval, write_json_atomic  # lazy: see above
    from megatron_pz.eval.mask_accuracy import run_mask_accuracy  # lazy: see above

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.run_config:
        return _run_heldout(args)
    if args.compare or args.overrides:
        raise ConfigError("eval: --compare and key=value overrides go with --run-config")
    if not tasks and not args.mask_accuracy:
        raise ConfigError("eval: give --tasks and/or --mask-accuracy (or --run-config)")
    if args.mask_accuracy and not args.data:
        raise ConfigError("eval --mask-accuracy needs --data (a preprocessed passages folder)")
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no config.json there",
                          remedy="give a Hugging Face folder (`megatron-pz convert megatron-to-hf --out` writes one)")
    if args.mask_accuracy:
        check_dataset(args.data)
    if args.limit is not None and not args.limit > 0:
        raise ConfigError(f"--limit must be > 0 (examples per task, or a fraction below 1), got {args.limit}")
    summary: dict = {"model": args.model}
    if tasks:
        batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        summary["lm_eval"] = run_lm_eval(args.model, tasks, None, args.include_path, args.num_fewshot,
                                         args.limit, batch, args.device, args.dtype, args.seed)
    if args.mask_accuracy:
        summary["mask_accuracy"] = run_mask_accuracy(
            args.model, args.data, None, args.spans_per_passage, args.max_passages, args.heldout_fraction,
            args.max_new_tokens, args.normalize, args.seed, args.device, args.dtype, args.spans)
    write_json_atomic(args.output, summary)
    brief = {k: v.get("results", {k2: v2 for k2, v2 in v.items() if k2 != "samples"})
             for k, v in summary.items() if isinstance(v, dict)}
    print(json.dumps(brief, indent=2, default=str))
    print(f"wrote {Path(args.output)}")
    return 0


def _run_heldout(args) -> int:
    from megatron_pz.eval.folder import evaluate_folder, format_comparison, read_records  # lazy: see above
    from megatron_pz.run_config import load_run_config  # lazy: see above

    cfg = load_run_config(args.run_config, args.overrides)
    before = read_records(args.compare) if args.compare else None  # a bad path fails before the evaluation
    metrics, records = evaluate_folder(args.model, cfg)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out)
    for key in sorted(metrics):
        if not key.endswith(("_low", "_high")):
            low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
            interval = f" [{low:.4f}, {high:.4f}]" if low is not None else ""
            print(f"{key}: {metrics[key]:.4f}{interval}")
    if before is not None:
        print(format_comparison(before, records))
    print(f"wrote {out} ({len(records)} item records)")
    return 0

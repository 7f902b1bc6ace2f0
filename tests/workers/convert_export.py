"""Run ``megatron-pz convert megatron-to-hf`` (in-process, world of one) for each (ckpt, out) pair given.

argv: [--import-bf16 HF_DIR CKPT_ROOT] ckpt1 out1 [ckpt2 out2 ...]
``--import-bf16`` first imports HF_DIR in-process at TP=1 as a bfloat16 model (the pairs may export it).
"""

import sys

from megatron_pz.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--import-bf16"]:
        from megatron_pz.convert.hf_to_megatron import import_hf_checkpoint

        import_hf_checkpoint(args[1], args[2], dtype="bfloat16", device="cpu")
        args = args[3:]
    for ckpt, out in zip(args[::2], args[1::2]):
        rc = main(["convert", "megatron-to-hf", "--ckpt", ckpt, "--out", out, "--device", "cpu",
                   "--max-shard-size-mb", "0"])
        assert rc == 0, (ckpt, rc)

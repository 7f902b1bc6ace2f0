"""Run ``megatron-pz convert megatron-to-hf`` (in-process, world of one) for each (ckpt, out) pair given.

argv: ckpt1 out1 [ckpt2 out2 ...]
"""

import sys

from megatron_pz.cli import main

if __name__ == "__main__":
    pairs = sys.argv[1:]
    for ckpt, out in zip(pairs[::2], pairs[1::2]):
        rc = main(["convert", "megatron-to-hf", "--ckpt", ckpt, "--out", out, "--device", "cpu",
                   "--max-shard-size-mb", "0"])
        assert rc == 0, (ckpt, rc)

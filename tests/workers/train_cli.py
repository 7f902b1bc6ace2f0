"""`megatron-pz ...` under torchrun (the console script itself, as a cluster launch runs it).

The main guard matters: Megatron's checkpoint writer starts a 'spawn' helper process, which
re-imports this file.
"""

import sys

from megatron_pz.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

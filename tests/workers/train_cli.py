"""`megatron-pz ...` under torchrun (the console script itself, as a cluster launch runs it).

The main guard, as the console script has it: a process started with the 'spawn' method re-imports
this file (megatron-core's checkpoint writer would start one per rank; megatron_pz.checkpoint keeps it
from doing so, see _writer_results_in_process).
"""

import sys

from megatron_pz.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

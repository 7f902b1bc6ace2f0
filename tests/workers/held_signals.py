"""A rank of megatron_pz.runtime.launcher that takes long to start: tests/test_preemption_units.py signals it
before it installs its stop handlers. Writes started.RANK (its pid) at once, waits for DIR/go (the stand-in for
imports and model build), installs the handlers, and writes seen.RANK: the stop signals blocked when it started
and those it received once its handlers were up. Exits 75 when it received any (as `megatron-pz train` does)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask this process started with
out, rank = Path(sys.argv[1]), os.environ["RANK"]
(out / f"started.{rank}").write_text(str(os.getpid()))
deadline = time.time() + 60
while not (out / "go").exists() and time.time() < deadline:
    time.sleep(0.02)

from megatron_pz.runtime.preemption import (EXIT_STOPPED, STOP_SIGNALS, ignore_stop_signals,  # noqa: E402
                                            install_stop_signals)

stop = install_stop_signals()
time.sleep(0.2)  # a signal forwarded by the launcher at this moment is in too
(out / f"seen.{rank}").write_text(json.dumps({
    "blocked_at_start": sorted(s.name for s in STOP_SIGNALS if s in blocked),
    "received": sorted(s.name for s in stop.received)}))
# as `megatron-pz train` exits: the agent SIGTERMs the ranks still alive once one has exited non-zero (75), and a
# rank in interpreter shutdown has lost its handlers, so the stop signals are ignored from here on
ignore_stop_signals()
sys.exit(EXIT_STOPPED if stop.received else 1)

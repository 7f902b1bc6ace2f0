"""``python -m megatron_pz.runtime.launcher [torchrun arguments]``: torchrun that lets the ranks checkpoint.

Same arguments and agent as ``torchrun`` (torch 2.13's own parser and ``torch.distributed.run.run``),
two things changed:

* **SIGTERM and SIGUSR1 are forwarded, not acted on.** torch's agent turns the signals named by
  ``--signals-to-handle`` (default SIGTERM, SIGINT, SIGHUP, SIGQUIT; ``PContext.start`` in
  ``torch/distributed/elastic/multiprocessing/api.py``) into ``SignalException``: it sends the signal to
  each rank's process group, SIGKILLs what is left ``--shutdown-timeout`` (30 s) later, whether or not
  a checkpoint is being written, and exits 1. SIGUSR1 is not in that list, so its default action ends
  the agent and leaves the ranks running. Here both are taken out of the list and sent on to the ranks
  (the agent's children only, not their process groups); the agent goes on watching the ranks, which
  write their checkpoint and exit (:mod:`megatron_pz.runtime.preemption`). The deadline is the
  scheduler's (SLURM sends SIGKILL ``KillWait`` after SIGTERM). SIGINT, SIGHUP and SIGQUIT keep torch's
  behaviour: stop now, without a checkpoint.
* **The exit code says what happened.** 0: every rank finished. When every rank exited with the same
  non-zero code, that code: :data:`~megatron_pz.runtime.preemption.EXIT_STOPPED` (75) after a stop
  signal with the checkpoint written, 2 for a run refused before any work (bad config, run directory
  locked). Anything else (a crash, a rank killed): 1, after torch's failure summary.
"""

from __future__ import annotations

import os
import signal
import sys

from megatron_pz.errors import EXIT_BAD_INPUT
from megatron_pz.runtime.preemption import EXIT_STOPPED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _forward(signum, _frame) -> None:
    import psutil

    sig = signal.Signals(signum)
    ranks = psutil.Process().children(recursive=False)  # the agent's workers (SubprocessHandler Popen)
    for rank in ranks:
        try:
            os.kill(rank.pid, sig)
        except ProcessLookupError:
            pass
    if not ranks:  # no rank started yet: nothing to checkpoint, nobody to wait for
        os.write(2, f"launcher: {sig.name} before any rank started; exiting\n".encode())
        os._exit(_stopped_code())
    os.write(2, f"launcher: {sig.name} forwarded to ranks {[r.pid for r in ranks]}; waiting for their "
                f"checkpoint\n".encode())


def _stopped_code() -> int:
    return EXIT_STOPPED


def exit_code(failures: dict) -> int:
    """The launcher's exit code from torch's per-rank failures (``ChildFailedError.failures``). A run refused
    before any work (2) stays 2 when the agent stopped the other ranks (SIGTERM) before they had said so."""
    codes = {f.exitcode for f in failures.values()}
    if len(codes) == 1 and next(iter(codes)) > 0:
        return next(iter(codes))
    if EXIT_BAD_INPUT in codes and codes <= {EXIT_BAD_INPUT, -signal.SIGTERM}:
        return EXIT_BAD_INPUT
    return 1


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = {s.name for s in FORWARDED}
    args.signals_to_handle = ",".join(s.strip() for s in args.signals_to_handle.split(",")
                                      if s.strip() and s.strip() not in names)
    for sig in FORWARDED:
        signal.signal(sig, _forward)
        signal.siginterrupt(sig, False)
    try:
        run(args)
    except ChildFailedError as exc:
        code = exit_code(exc.failures)
        if code == EXIT_STOPPED:
            print(f"launcher: every rank stopped on a signal after writing its checkpoint (exit {code}); "
                  f"resubmit to continue", file=sys.stderr, flush=True)
        elif code == EXIT_BAD_INPUT:  # the ranks said why, in one line (torch's summary would add a page)
            print(f"launcher: the run was refused before any work (exit {code}): see the error above",
                  file=sys.stderr, flush=True)
        else:
            print(exc.format_msg(), file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

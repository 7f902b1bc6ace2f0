"""``python -m megatron_pz.runtime.launcher [torchrun arguments]``: torchrun that lets the ranks checkpoint.

Same arguments and agent as ``torchrun`` (torch 2.13's own parser and ``torch.distributed.run.run``),
three things changed:

* **SIGTERM and SIGUSR1 are held from the first moment and forwarded, not acted on.** torch's agent turns
  the signals named by ``--signals-to-handle`` (default SIGTERM, SIGINT, SIGHUP, SIGQUIT; ``PContext.start``
  in ``torch/distributed/elastic/multiprocessing/api.py``) into ``SignalException``: it sends the signal to
  each rank's process group, SIGKILLs what is left ``--shutdown-timeout`` (30 s) later, whether or not a
  checkpoint is being written, and exits 1. SIGUSR1 is not in that list, so its default action ends the
  agent and leaves the ranks running. Here both are taken out of the list, **blocked** as the launcher's
  first act (before torch is imported; ``megatron_pz.runtime`` imports nothing heavy for this reason) and
  taken by a thread of their own (``sigtimedwait``), which sends each one on to every rank, once, including
  ranks that start after it arrived (a signal during the launcher's start-up is held for them, not lost).
  The agent goes on watching the ranks, which write their checkpoint and exit
  (:mod:`megatron_pz.runtime.preemption`). The deadline is the scheduler's (SLURM sends SIGKILL ``KillWait``
  after SIGTERM). SIGINT, SIGHUP and SIGQUIT keep torch's behaviour: stop now, without a checkpoint.
* **The ranks start with SIGTERM and SIGUSR1 blocked** (a blocked signal stays pending in the kernel): the
  signal mask is inherited through ``fork`` and ``exec``, so a signal that reaches a rank while it imports
  torch and Megatron or builds its model (forwarded, or sent by SLURM to every process of the step) is
  held there until the rank installs its handlers (``install_stop_signals``, the first thing
  ``megatron-pz train`` does), which unblocks them: the rank then stops at its first agreement point
  instead of dying of a signal it could not yet handle. A program run under this launcher must call
  ``install_stop_signals()`` (or unblock the two signals itself) to be stoppable before ``KillWait``.
* **The exit code says what happened.** 0: every rank finished. When every rank exited with the same
  non-zero code, that code: :data:`~megatron_pz.runtime.preemption.EXIT_STOPPED` (75) after a stop
  signal with the checkpoint written, 2 for a run refused before any work (bad config, run directory
  locked). Anything else (a crash, a rank killed): 1, after torch's failure summary.

Imports: the standard library at the top; torch and psutil inside :func:`main` and the forwarding thread,
after the signals are blocked (the one reason this module does not import them at its top).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from megatron_pz.errors import EXIT_BAD_INPUT  # a leaf module: no torch

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


class Forwarder:
    """Takes the blocked stop signals (a thread of its own) and sends each, once, to every rank the agent
    has started or starts later (the agent's children: ``SubprocessHandler`` ``Popen``s)."""

    def __init__(self, poll_s: float = 0.25):
        self.poll_s = poll_s
        self.held: list[signal.Signals] = []  # every stop signal received, in order of arrival
        self.sent: dict[int, set[signal.Signals]] = {}  # rank pid -> the signals it has been sent

    def start(self) -> "Forwarder":
        threading.Thread(target=self._run, name="pz-stop-signals", daemon=True).start()
        return self

    def _run(self) -> None:
        while True:
            info = signal.sigtimedwait(FORWARDED, self.poll_s)
            if info is not None and signal.Signals(info.si_signo) not in self.held:
                self.held.append(signal.Signals(info.si_signo))
                if not self.forward():
                    _say(f"launcher: {self.held[-1].name} before any rank started: held for the ranks")
            elif self.held:
                self.forward()

    def forward(self) -> list[int]:
        """Send every held signal to every rank that has not had it; the ranks it went to."""
        import psutil

        reached, names = [], []
        for rank in psutil.Process().children(recursive=False):
            sent = self.sent.setdefault(rank.pid, set())
            for sig in (s for s in self.held if s not in sent):
                try:
                    os.kill(rank.pid, sig)
                except ProcessLookupError:
                    break
                sent.add(sig)
                reached += [rank.pid] if rank.pid not in reached else []
                names += [sig.name] if sig.name not in names else []
        if reached:
            _say(f"launcher: {'+'.join(names)} forwarded to ranks {reached}; waiting for their checkpoint")
        return reached


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode())


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
    # First: from here on a stop signal is held (pending) until the forwarding thread takes it; every thread
    # and rank started later inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    Forwarder().start()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from megatron_pz.runtime.preemption import EXIT_STOPPED  # after the signals are blocked (module docstring)

    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = {s.name for s in FORWARDED}
    args.signals_to_handle = ",".join(s.strip() for s in args.signals_to_handle.split(",")
                                      if s.strip() and s.strip() not in names)
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

"""Why a stage process ended, in words a user can act on.

A stage that dies of a signal left no error of its own: the daemon reads the
wait status, the child's peak memory (wait4's rusage) and the machine's memory,
and says what probably happened and what to do. Whether the job is retried is
decided elsewhere (`retryable`): a crash that will happen again (SIGILL from a
build for another CPU) is not worth a retry; an OOM kill or a lost machine is.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass


@dataclass
class ExitReason:
    code: int  # Popen-style: >= 0 exit status, < 0 the signal number negated
    message: str  # one sentence for status.json's error.message
    hint: str  # what to do about it
    retryable: bool  # a later attempt, resuming from the checkpoint, may succeed
    peak_rss_bytes: int | None = None


def peak_rss_bytes(rusage: object | None) -> int | None:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    value = getattr(rusage, "ru_maxrss", None)
    if not value:
        return None
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def memory_available() -> tuple[int, int] | None:
    """(available, total) bytes of RAM, from /proc/meminfo (Linux) or sysconf; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def explain(code: int, stage: str, rusage: object | None = None, stopped_by_us: bool = False) -> ExitReason:
    """The reason a stage process that did not end cleanly ended."""
    peak = peak_rss_bytes(rusage)
    if code >= 0:
        return ExitReason(code, f"stage {stage} crashed (exit code {code})",
                          f"see logs/{stage}.log in the job's outbox folder", retryable=False, peak_rss_bytes=peak)
    sig = -code
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    what = f"stage {stage} was killed by {name}"
    if sig == signal.SIGILL:
        return ExitReason(code, f"{what} (illegal instruction): llama.cpp or another native library was compiled "
                                "for another CPU", "run `lorad doctor`; `lorad install-llama` rebuilds llama.cpp "
                                "with portable CPU flags", retryable=False, peak_rss_bytes=peak)
    if sig == signal.SIGKILL and not stopped_by_us:
        mem = memory_available()
        facts = []
        if peak:
            facts.append(f"peak RSS {_gib(peak)}")
        if mem:
            facts.append(f"{_gib(mem[0])} of {_gib(mem[1])} available now")
        detail = f" ({', '.join(facts)})" if facts else ""
        return ExitReason(code, f"{what}, probably out of memory: the kernel's OOM killer{detail}",
                          "lower train.batch_size or train.max_seq_length, use model.quantize, or close other "
                          "programs; the job resumes from its last checkpoint", retryable=True, peak_rss_bytes=peak)
    if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        hint = ("a memory-mapped file changed under it, or the disk is full" if sig == signal.SIGBUS
                else "a native library crashed; see the log's last lines, and `lorad doctor`")
        return ExitReason(code, f"{what} (a crash in native code)", hint, retryable=True, peak_rss_bytes=peak)
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL):
        return ExitReason(code, f"{what} from outside lorad", "the job resumes from its last checkpoint",
                          retryable=True, peak_rss_bytes=peak)
    return ExitReason(code, what, f"see logs/{stage}.log", retryable=True, peak_rss_bytes=peak)

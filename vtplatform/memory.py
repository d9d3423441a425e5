"""This process's memory, read from ``/proc/self/status`` (0 where there is no /proc): what job
summaries, model stages and training epochs report, and what memory tests and benchmarks check."""

from __future__ import annotations

from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    """Peak resident memory (VmHWM), in MB. It counts the pages of Ray's object store that the
    process mapped to read blocks without a copy."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """Resident memory now (VmRSS), in MB."""
    return _status_mb("VmRSS")


def private_rss_mb() -> float:
    """Resident memory of its own now (RssAnon: not files, not the object store's shared pages), in MB."""
    return _status_mb("RssAnon")


def reset_peak() -> None:
    """Resets VmHWM to the memory resident now (Linux ``/proc/self/clear_refs``), so that a later
    ``peak_rss_mb`` measures from here, not from what the process did before (a Ray worker may
    have run other tasks before it became an actor). Where it cannot, the peak can only read high."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(f"{key}:")), 0.0)
    except OSError:
        return 0.0


@dataclass
class ActorMemory:
    """A model actor's own memory (``private_rss_mb``: not the object store's shared pages it maps
    to read blocks), from right after it loaded its model: ``grown``, how far it has grown at its
    highest; ``call``, the most that one call added over the memory it started with (the actor's
    first call left out: the runtime sets itself up then, once). ``sample`` while a call holds
    its data in hand."""

    loaded: float = field(default_factory=private_rss_mb)
    grown: float = 0.0
    call: float = 0.0
    calls: int = 0
    _start: float = 0.0
    _top: float = 0.0

    def begin(self) -> None:
        self._start = self._top = private_rss_mb()

    def sample(self) -> None:
        self._top = max(self._top, private_rss_mb())

    def end(self) -> None:
        self.sample()
        self.grown = max(self.grown, self._top - self.loaded)
        if self.calls:
            self.call = max(self.call, self._top - self._start)
        self.calls += 1

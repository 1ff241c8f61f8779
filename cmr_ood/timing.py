"""Wall time per stage of a case: read, preprocess, network, postprocess, ood, qc, write.

A :class:`StageTimer` belongs to one case. Code marks its stages with :func:`stage` (``with stage("network"):
...``); the marks cost a context-variable lookup when no timer is active, and two clock reads when one is,
so they stay in the code path at all times. Stages nest: time spent in an inner stage is counted for it
and not for the stage around it, so the stages of a case add up to the time the timer was running.

On a GPU, kernels run asynchronously and a stage's clock would stop before its work is done; a timer made
with ``synchronize=True`` waits for the device at each stage boundary (which costs throughput, so it is
only done when asked: benchmarks ask, batch runs do not).
"""

from __future__ import annotations

import time
from contextvars import ContextVar

import torch

#: The stages of a case in the order they run (``postprocess``: inversion to the input grid, argmax and
#: connected components; ``qc``: measurements, plausibility checks and the QC classifier).
STAGES = ("read", "preprocess", "network", "postprocess", "ood", "qc", "write")

_active: ContextVar[StageTimer | None] = ContextVar("cmr_ood_stage_timer", default=None)


class StageTimer:
    """Exclusive wall time per stage name, summed over every entry of the stage."""

    def __init__(self, synchronize: bool = False):
        self.synchronize = bool(synchronize) and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def _now(self, sync: bool) -> float:
        if sync and self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, name: str, sync: bool = True) -> None:
        now = self._now(sync)
        if self._stack:
            self._charge(self._stack[-1], now)
        self._stack.append(name)
        self._since = now

    def exit(self, sync: bool = True) -> None:
        self._charge(self._stack.pop(), self._now(sync))

    def _charge(self, name: str, now: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._since)
        self._since = now

    def stage(self, name: str, sync: bool = True) -> _Stage:
        """A context timing ``name`` on this timer; ``sync=False`` for host-only work (reading, writing),
        which must not wait for the device's queue."""
        return _Stage(self, name, sync)

    def activate(self) -> _Activation:
        """A context in which :func:`stage` marks are charged to this timer (in this thread only)."""
        return _Activation(self)

    def add(self, other: StageTimer, share: float = 1.0) -> None:
        """Charge ``share`` of ``other``'s seconds per stage to this timer (work done for several cases at once)."""
        for name, seconds in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + share * seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def rounded(self, digits: int = 4) -> dict[str, float]:
        """The seconds per stage, in :data:`STAGES` order, for a record."""
        order = {name: i for i, name in enumerate(STAGES)}
        return {k: round(v, digits) for k, v in sorted(self.seconds.items(), key=lambda kv: order.get(kv[0], len(order)))}


class _Stage:
    __slots__ = ("timer", "name", "sync")

    def __init__(self, timer: StageTimer | None, name: str, sync: bool):
        self.timer, self.name, self.sync = timer, name, sync

    def __enter__(self) -> None:
        if self.timer is not None:
            self.timer.enter(self.name, self.sync)

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.exit(self.sync)


class _Activation:
    __slots__ = ("timer", "token")

    def __init__(self, timer: StageTimer):
        self.timer, self.token = timer, None

    def __enter__(self) -> StageTimer:
        self.token = _active.set(self.timer)
        return self.timer

    def __exit__(self, *exc) -> None:
        _active.reset(self.token)


def stage(name: str, sync: bool = True) -> _Stage:
    """Time ``name`` on the timer active in this thread, if any (else nothing happens)."""
    return _Stage(_active.get(), name, sync)

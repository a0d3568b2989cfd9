"""Timing engines at load, and knowing when the timing cannot be trusted.

design: every candidate is timed at a batch size in interleaved rounds (each round times every engine
once, in a rotating order, and each engine keeps its best round), so a burst of load on a shared
machine hits all of them rather than the one timed at that moment. `CpuMeter` measures the CPU time
other processes spent on this process's cores meanwhile; above `FOREIGN_LIMIT_CORES` the plan made
from the timing is provisional (binserve/engines/plans.py).
"""

from __future__ import annotations

import os
import time

#: interleaved timing rounds per batch size at load, and the time each engine gets per round
ROUNDS = 5
ROUND_BUDGET_S = 0.03
#: other processes' CPU on our cores during the timing (cores, averaged) above which a plan is provisional
FOREIGN_LIMIT_CORES = 0.5


class CpuMeter:
    """CPU time other processes spend on the cores this process may use, over a window.

    From /proc/stat (busy and steal jiffies of the CPUs in our affinity mask) minus this process's
    own CPU time (`os.times`). Where /proc/stat is missing (not Linux) it reports 0.
    """

    def __init__(self) -> None:
        try:
            self.cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        except AttributeError:
            self.cpus = set()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._snapshot()

    def _busy_s(self) -> float:
        busy = 0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *vals = line.split()
                    if name in self.cpus:
                        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in vals[:8])
                        busy += user + nice + system + irq + softirq + steal
        except (OSError, ValueError):
            return 0.0
        return busy / self.tick

    def _snapshot(self) -> tuple[float, float, float]:
        t = os.times()
        return time.monotonic(), self._busy_s(), t.user + t.system

    def foreign_cores(self) -> float:
        """Other processes' CPU on our cores since the meter started, in cores (0 when unknown, or
        when the window is too short for /proc/stat's 10 ms ticks to say anything)."""
        wall0, busy0, own0 = self._start
        wall1, busy1, own1 = self._snapshot()
        if wall1 - wall0 < 0.25 or busy1 == 0.0:
            return 0.0
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))



def _time_call(engine, host: dict, budget_s: float) -> float:
    """Best time of one call within `budget_s` (at least one call)."""
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        t0 = time.perf_counter()
        engine(host)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def time_engines(engines: list, host: dict) -> dict[str, float]:
    """Seconds per call of each engine on `host`: best of `ROUNDS` interleaved rounds."""
    for engine in engines:
        engine(host)  # first call: allocations, kernel selection
    best = {e.name: float("inf") for e in engines}
    for r in range(ROUNDS):
        for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:
            best[engine.name] = min(best[engine.name], _time_call(engine, host, ROUND_BUDGET_S))
    return best


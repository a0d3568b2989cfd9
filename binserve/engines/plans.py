"""Which engine runs each batch: the plan made at load, and kept honest while serving.

design: at load every candidate engine that passes the accuracy gate is timed at `BENCH_SIZES` on
this machine, in interleaved rounds (each round times every engine once, in a rotating order, and
each engine keeps its best round), so a burst of load on a shared machine hits all of them rather
than the one timed at that moment. The CPU time other processes spent on this process's cores
during the timing is measured too; above `FOREIGN_LIMIT_CORES` the plan is *provisional*: it is
used, but its record is not trusted by the next load, which times again. Each batch-size bucket goes
to its fastest engine. While serving, the plan checks itself on real batches: one batch in
`EXPLORE_FIRST` of a bucket (`EXPLORE_PROVISIONAL` for a provisional plan) runs on one of its
alternatives (the other engines that passed the gate, in turn; ever more rarely, down to one in
`EXPLORE_MAX`, while they prove slower), each such time is paired with the chosen engine's recent
median at that moment (a load that comes and goes hits both sides of a pair), and the bucket goes
to an alternative once the median of its pairs is below `SWITCH_MARGIN`. The alternatives'
answers are served (they passed the same gate). A plan timed next to a busy neighbour so ends up
with engines as fast as a quiet machine's, and `describe()` shows the live figures beside the
load-time ones. Each process checks its own plan; what it learns is saved in the version's record.

The workers of one server (one `boot`: the Gunicorn master's start) serve with one plan, so a request
gets the same engine whichever worker it lands on: the first worker to load times the engines and
saves the record, its siblings adopt that record even when it is provisional (a second, concurrent
timing would disagree with the first by chance, and the replies would then differ by engine), and a
step the online check moves in one worker is followed by the others (`Plan.follow`). A later boot
trusts a provisional record no more than before: it times again.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from binserve.engines.timing import FOREIGN_LIMIT_CORES, CpuMeter, time_engines

log = logging.getLogger("binserve.engines")

BENCH_SIZES = (1, 4, 16)  # the plan's batch sizes; a batch goes to the winner of the nearest one
#: the online check: recent batches kept per engine and bucket, the fewest to judge on, how often an
#: alternative runs (at first; for a provisional plan; at most rarely), and how much faster it must
#: be to take the bucket
LIVE_WINDOW = 16
LIVE_MIN = 5
EXPLORE_FIRST = 32
EXPLORE_PROVISIONAL = 8
EXPLORE_MAX = 1024
SWITCH_MARGIN = 0.9


@dataclass
class Trial:
    """What happened to one candidate at load."""

    engine: str
    used: bool = False
    passed: bool | None = None
    accuracy: str | None = None
    seq_per_s: dict[int, float] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "engine": self.engine,
            "used": self.used,
            "accuracy": self.accuracy,
            "seq_per_s": {str(k): round(v, 1) for k, v in self.seq_per_s.items()},
            "note": self.note,
        }

    @classmethod
    def from_record(cls, engine: str, rec: dict) -> Trial:
        seq = {int(n): float(v) for n, v in rec.get("seq_per_s", {}).items()}
        return cls(engine, bool(rec.get("used")), rec.get("passed"), rec.get("accuracy"), seq, rec.get("note", ""))



class Plan:
    """Which engine runs a batch of n samples: steps of (largest n, engine), the last unbounded,
    checked online against each step's alternatives (see the module's design)."""

    def __init__(
        self,
        steps: list[tuple[float, object]],
        trials: list[Trial],
        alternatives: list[list] | None = None,
        provisional: bool = False,
        foreign_cores: float = 0.0,
        boot: str | None = None,
    ) -> None:
        self.steps = list(steps)
        #: the server start this plan was made in (the workers of one boot share one plan)
        self.boot = boot
        self.trials = trials
        #: per step, the other engines that passed the gate, fastest at load first: tried now and then
        self.alternatives = [list(a) for a in alternatives] if alternatives else [[] for _ in steps]
        self.provisional = provisional
        self.foreign_cores = foreign_cores
        #: called with the plan after the online check changed a step (the adapter saves its record)
        self.on_change: Callable[[Plan], None] | None = None
        self.switches: list[dict] = []
        self._lock = threading.Lock()
        self._batches = [0] * len(self.steps)
        self._tries = [0] * len(self.steps)
        self._first = EXPLORE_PROVISIONAL if provisional else EXPLORE_FIRST
        self._explore_every = [self._first] * len(self.steps)
        self._recent: dict[tuple[int, str], deque] = {}  # (step, engine) -> recent seconds per sample
        self._ratios: dict[tuple[int, str], deque] = {}  # (step, alternative) -> its time / the chosen's

    def _step(self, n: int) -> int:
        for i, (limit, _) in enumerate(self.steps):
            if n <= limit:
                return i
        return len(self.steps) - 1

    def engine_for(self, n: int):
        """The engine for a batch of n: the step's, or now and then one of its alternatives."""
        i = self._step(n)
        with self._lock:
            self._batches[i] += 1
            alts = self.alternatives[i]
            if alts and self._batches[i] % self._explore_every[i] == 0:
                self._tries[i] += 1
                return alts[self._tries[i] % len(alts)]
            return self.steps[i][1]

    def observe(self, n: int, engine, seconds: float) -> None:
        """A real batch of n ran on `engine` in `seconds`. An alternative's time is paired with the
        chosen engine's recent median at that moment (so a load that comes and goes hits both), and
        the step goes to the alternative once the median of its pairs is below `SWITCH_MARGIN`."""
        i, per_sample, changed = self._step(n), seconds / n, None
        with self._lock:
            self._recent.setdefault((i, engine.name), deque(maxlen=LIVE_WINDOW)).append(per_sample)
            chosen = self.steps[i][1]
            mine = self._recent.get((i, chosen.name))
            if engine is chosen or engine not in self.alternatives[i] or not mine or len(mine) < LIVE_MIN:
                return
            ratios = self._ratios.setdefault((i, engine.name), deque(maxlen=LIVE_WINDOW))
            ratios.append(per_sample / statistics.median(mine))
            if len(ratios) < LIVE_MIN:
                return
            ratio = statistics.median(ratios)
            if ratio < SWITCH_MARGIN:
                changed = self._switch(i, chosen, engine, ratio)
            elif ratio > 1 / SWITCH_MARGIN:
                self._explore_every[i] = min(EXPLORE_MAX, 2 * self._explore_every[i])  # confirmed slower
                ratios.clear()
        if changed is not None:
            log.warning(
                "plan: batches up to %s now run on %s, %.0f%% of %s's time on live batches",
                _limit(self.steps[i][0]), changed["to"], 100 * changed["ratio"], changed["from"],
            )  # fmt: skip
            if self.on_change is not None:
                self.on_change(self)

    def _switch(self, i: int, chosen, faster, ratio: float | None, source: str = "live") -> dict:
        """Under the lock: step i runs on `faster` from now on; what was chosen becomes an alternative."""
        self.steps[i] = (self.steps[i][0], faster)
        self.alternatives[i] = [chosen] + [a for a in self.alternatives[i] if a is not faster]
        for alt in self.alternatives[i]:
            self._ratios.pop((i, alt.name), None)  # measured against the old choice
        self._ratios.pop((i, faster.name), None)
        self._explore_every[i] = self._first
        size = BENCH_SIZES[min(i, len(BENCH_SIZES) - 1)]
        by_name = {t.engine: t for t in self.trials}
        for engine in (faster, chosen):  # what serving measured replaces the load-time figure
            recent = self._recent.get((i, engine.name))
            if engine.name in by_name and recent:
                by_name[engine.name].seq_per_s[size] = 1.0 / statistics.median(recent)
        used = {e.name for _, e in self.steps}
        for t in self.trials:
            t.used = t.engine in used
            if t.used and t.note.startswith("slower"):
                t.note = ""
            elif not t.used and t.seq_per_s and not t.note:
                t.note = "slower than the engines used (live)"
        switch = {"max_batch": _limit(self.steps[i][0]), "from": chosen.name, "to": faster.name, "ratio": ratio,
                  "source": source}
        self.switches.append(switch)
        return switch

    def release_unused(self) -> None:
        """Let go of the engines the plan does not use, so a worker holds only what it serves: a plan
        timed on a quiet machine keeps no alternatives; a provisional one keeps each step's runner-up,
        which its online check may still find faster (see the module's design)."""
        keep = 1 if self.provisional else 0
        with self._lock:
            self.alternatives = [alts[:keep] for alts in self.alternatives]

    def holds(self) -> set[str]:
        """The names of every engine the plan still holds: its steps' and their alternatives'."""
        with self._lock:
            return {e.name for _, e in self.steps} | {a.name for alts in self.alternatives for a in alts}

    @property
    def engines(self) -> list[str]:
        """The engines the plan uses, smallest batches first."""
        return [e.name for _, e in _merged(self.steps)]

    def record(self) -> dict:
        """Every candidate's verdict, timings and fate, to reuse on the next load of the same files here."""
        rec = {
            t.engine: {"used": t.used, "passed": t.passed, "accuracy": t.accuracy, "note": t.note,
                       "seq_per_s": {str(n): v for n, v in t.seq_per_s.items()}}
            for t in self.trials
        }  # fmt: skip
        rec["_meta"] = {"provisional": self.provisional, "foreign_cores": round(self.foreign_cores, 2)}
        with self._lock:
            rec["_meta"]["steps"] = [e.name for _, e in self.steps]
        if self.boot is not None:
            rec["_meta"]["boot"] = self.boot
        return rec

    def follow(self, record: dict) -> bool:
        """Take each step's engine from a sibling worker's record (its online check moved it), when
        that engine is one this plan has; True when a step changed. The engine this step had becomes
        an alternative, as after a switch of our own."""
        names = record.get("_meta", {}).get("steps")
        if not isinstance(names, list) or len(names) != len(self.steps):
            return False
        changed = False
        with self._lock:
            for i, name in enumerate(names):
                chosen = self.steps[i][1]
                faster = next((a for a in self.alternatives[i] if a.name == name), None)
                if chosen.name != name and faster is not None:
                    self._switch(i, chosen, faster, ratio=None, source="sibling")
                    changed = True
        return changed

    def note_skipped(self, engine: str, why: str) -> None:
        """Record a candidate that was not tried (not native here, not applicable)."""
        self.trials.append(Trial(engine, note=f"skipped: {why}"))

    def describe(self) -> dict:
        """For GET /models: the plan, each candidate's accuracy, speed and fate, and the live figures."""
        with self._lock:
            live = []
            for i, (limit, engine) in enumerate(self.steps):
                recent = {
                    name: {"ms_per_sample": round(statistics.median(w) * 1000, 4), "batches": len(w)}
                    for (step, name), w in self._recent.items()
                    if step == i and w
                }
                ratios = {
                    name: round(statistics.median(r), 3) for (step, name), r in self._ratios.items() if step == i and r
                }
                live.append({
                    "max_batch": _limit(limit), "engine": engine.name, "recent": recent,
                    "alternatives": [a.name for a in self.alternatives[i]], "tried_every": self._explore_every[i],
                    "time_vs_engine": ratios,
                })  # fmt: skip
            switches = list(self.switches)
        steps = [{"max_batch": _limit(limit), "engine": e.name} for limit, e in _merged(self.steps)]
        return {
            "plan": steps,
            "provisional": self.provisional,
            "foreign_cores_at_load": round(self.foreign_cores, 2),
            "candidates": [t.as_dict() for t in self.trials],
            "live": live,
            "switches": switches,
        }


def _limit(limit: float) -> int | None:
    return None if limit == float("inf") else int(limit)


def _merged(steps: list[tuple[float, object]]) -> list[tuple[float, object]]:
    out: list[tuple[float, object]] = []
    for limit, engine in steps:
        if out and out[-1][1] is engine:
            out[-1] = (limit, engine)
        else:
            out.append((limit, engine))
    return out



def make_plan(
    reference,
    candidates: list[tuple[str, Callable[[], object]]],
    collate: Callable[[int], dict],
    gate_sets: list[dict],
    accuracy: Callable[[dict, dict], tuple[bool, str]],
    reference_eligible: bool = True,
    record: dict | None = None,
    boot: str | None = None,
) -> Plan:
    """Gate every candidate against `reference` on `gate_sets`, time those that pass, pick per batch size.

    `collate(n)` gives host arrays of n representative samples for timing. The reference (torch
    fp32) competes like any candidate when `reference_eligible`; otherwise (the operator asked for
    another engine) it is used only when no candidate passes, so a plan always exists.

    `record` is `Plan.record()` from an earlier load of the same files with the same settings on
    this machine: then only the engines it used are built and gated again - and each step's
    runner-up, when the plan is a sibling's provisional one, whose online check needs them - (the
    others failed the gate or were slower, which the same files cannot change), and its
    timings are reused. If one of them now fails, or the record was provisional (timed under
    foreign load) and not made in this `boot` by a sibling worker, everything is evaluated afresh.
    """
    names = [reference.name] + [name for name, _ in candidates]
    meta = (record or {}).get("_meta", {})
    sibling = boot is not None and meta.get("boot") == boot
    if record and set(names) <= set(record) and (sibling or not meta.get("provisional")):
        # the runner-ups only serve a provisional plan's online check (a trusted plan lets them go)
        wanted = _used_and_runners_up(record, names, runners_up=sibling and bool(meta.get("provisional")))
        plan = _evaluate(reference, [(n, m) for n, m in candidates if n in wanted], collate, gate_sets, accuracy,
                         reference_eligible or reference.name in wanted, record)  # fmt: skip
        if plan is not None:
            plan.trials += [Trial.from_record(n, record[n]) for n in names if n not in wanted and n != reference.name]
            if sibling:  # the sibling's verdict on how trustworthy its timing was stands
                plan.provisional = bool(meta.get("provisional"))
                plan.foreign_cores = float(meta.get("foreign_cores", 0.0))
            plan.boot = boot
            plan.follow(record)  # steps the sibling's online check has moved since
            return plan
    plan = _evaluate(reference, candidates, collate, gate_sets, accuracy, reference_eligible, None)
    plan.boot = boot
    return plan


def _used_and_runners_up(record: dict, names: list[str], runners_up: bool = True) -> set[str]:
    """The engines a record's plan uses, and (`runners_up`) at each size the fastest other one that passed."""
    used = {n for n in names if record[n].get("used")}
    passed = [n for n in names if record[n].get("passed")]
    wanted = set(used)
    if not runners_up:
        return wanted
    for size in BENCH_SIZES:
        speed = {n: float(record[n].get("seq_per_s", {}).get(str(size), 0.0)) for n in passed if n not in used}
        best = max(speed, key=speed.get, default=None)
        if best is not None and speed[best] > 0:
            wanted.add(best)
    return wanted


def _evaluate(reference, candidates, collate, gate_sets, accuracy, reference_eligible, record) -> Plan | None:
    trials = [Trial(reference.name, passed=True, accuracy="reference")]
    passing = []
    expected = [reference(host) for host in gate_sets]
    for name, make in candidates:
        trial = Trial(name)
        trials.append(trial)
        try:
            engine = make()
            results = [accuracy(ref, engine(host)) for ref, host in zip(expected, gate_sets, strict=True)]
        except Exception as exc:  # a runtime that cannot run this model is not a candidate
            log.warning("engine %s is not available: %s: %s", name, type(exc).__name__, exc)
            trial.passed, trial.note = False, f"not available: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        trial.accuracy = "; ".join(msg for _, msg in results)
        trial.passed = all(ok for ok, _ in results)
        if trial.passed:
            passing.append(engine)
        else:
            trial.note = "failed the accuracy gate"
    if record is not None and len(passing) < len(candidates):
        return None  # an engine the record used now fails: evaluate everything again
    if reference_eligible or not passing:
        passing.insert(0, reference)
    by_name = {t.engine: t for t in trials}
    meter, foreign = CpuMeter(), 0.0
    if len(passing) > 1:
        if record is not None:
            for e in passing:
                by_name[e.name].seq_per_s = {int(n): float(v) for n, v in record[e.name]["seq_per_s"].items()}
        else:
            for n in BENCH_SIZES:
                for name, seconds in time_engines(passing, collate(n)).items():
                    by_name[name].seq_per_s[n] = n / seconds
            foreign = meter.foreign_cores()
    steps, alternatives = [], []
    for i, n in enumerate(BENCH_SIZES):
        ranked = sorted(passing, key=lambda e: -by_name[e.name].seq_per_s.get(n, 0.0))
        # a batch goes to the winner of the nearest measured size (geometric midpoints: 2, 8)
        limit = float("inf") if i == len(BENCH_SIZES) - 1 else (n * BENCH_SIZES[i + 1]) ** 0.5
        steps.append((limit, ranked[0]))
        alternatives.append(ranked[1:])
    for _, engine in steps:
        by_name[engine.name].used = True
    for t in trials:
        if not t.used and not t.note:
            t.note = "slower than the engines used" if t.seq_per_s else "not eligible: another engine was asked for"
    provisional = foreign > FOREIGN_LIMIT_CORES
    if provisional:
        log.warning(
            "plan timed while other processes used %.1f cores of this machine's; it is provisional: checked "
            "online while serving, and timed again at the next load", foreign,
        )  # fmt: skip
    return Plan(steps, trials, alternatives, provisional, foreign)

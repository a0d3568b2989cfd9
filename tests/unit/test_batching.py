"""The batcher with a lambda as its model and a hand-driven clock."""

from __future__ import annotations

import threading

import pytest

from binserve.errors import DeadlineExceeded, LimitExceeded, ModelFailure, Overloaded
from binserve.scheduling.batcher import Batcher
from binserve.scheduling.contract import BatchResult, BatchSettings


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GatedModel:
    """Doubles its inputs; each batch blocks until the test opens the gate, so queues can fill."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.gate = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)
        self.fail_on = fail_on

    def __call__(self, samples):
        self.batches.append(list(samples))
        self.entered.release()
        assert self.gate.acquire(timeout=10)
        if self.fail_on is not None and self.fail_on in samples:
            raise ValueError(f"cannot handle {self.fail_on}")
        return [2 * s for s in samples]


def test_lone_request_runs_at_once():
    b = Batcher(lambda xs: [x + 1 for x in xs]).start()
    res = b.submit([1], deadline=float("inf")).result(timeout=5)
    assert isinstance(res, BatchResult) and res.outputs == [2] and res.batch_size == 1
    b.close()


def test_arrivals_during_a_batch_form_the_next_batch():
    model = GatedModel()
    clock = FakeClock()
    b = Batcher(model, BatchSettings(max_batch_size=4), clock=clock).start()
    first = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)  # batch [0] is running
    later = [b.submit([i], deadline=1e9) for i in range(1, 7)]
    for _ in range(3):
        model.gate.release()
    assert first.result(timeout=5).outputs == [0]
    results = [f.result(timeout=5) for f in later]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert [r.outputs for r in results] == [[2], [4], [6], [8], [10], [12]]
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    b.close()


def test_large_request_is_split_and_rejoined_in_order():
    seen = []

    def model(xs):
        seen.append(len(xs))
        return [x * 10 for x in xs]

    b = Batcher(model, BatchSettings(max_batch_size=3)).start()
    res = b.submit(list(range(8)), deadline=1e9).result(timeout=5)
    assert res.outputs == [x * 10 for x in range(8)]
    assert seen == [3, 3, 2] and res.batch_size == 3
    b.close()


def test_expired_requests_never_reach_the_model():
    model = GatedModel()
    clock = FakeClock()
    b = Batcher(model, BatchSettings(max_batch_size=8), clock=clock).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    late = b.submit([1], deadline=clock.now + 0.5)
    on_time = b.submit([2], deadline=clock.now + 10)
    clock.now += 1.0  # the first request's deadline passes while it waits
    model.gate.release()
    model.gate.release()
    blocker.result(timeout=5)
    with pytest.raises(DeadlineExceeded, match="past its deadline"):
        late.result(timeout=5)
    assert on_time.result(timeout=5).outputs == [4]
    assert model.batches == [[0], [2]]
    b.close()


def test_failing_batch_fails_only_its_requests_and_the_thread_goes_on():
    model = GatedModel(fail_on=13)
    b = Batcher(model, BatchSettings(max_batch_size=2)).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    bad_batch = [b.submit([13], deadline=1e9), b.submit([1], deadline=1e9)]
    good = b.submit([2], deadline=1e9)
    for _ in range(3):
        model.gate.release()
    blocker.result(timeout=5)
    for f in bad_batch:
        with pytest.raises(ModelFailure, match=r"failed on a batch of 2 samples \(ValueError\)") as info:
            f.result(timeout=5)
        assert "cannot handle" not in info.value.message  # exception text stays in the server log
    assert good.result(timeout=5).outputs == [4]
    b.close()


def test_wrong_output_count_is_a_model_failure():
    b = Batcher(lambda xs: xs[:-1]).start()
    with pytest.raises(ModelFailure, match="returned 1 outputs for 2 inputs"):
        b.submit([1, 2], deadline=1e9).result(timeout=5)
    b.close()


def test_full_queue_answers_429_at_once_with_retry_after():
    model = GatedModel()
    b = Batcher(model, BatchSettings(max_batch_size=2), max_queue_samples=3).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    queued = b.submit([1, 2, 3], deadline=1e9)
    with pytest.raises(Overloaded, match="3 samples queued") as info:
        b.submit([4], deadline=1e9)
    assert info.value.retry_after_s >= 1
    assert b.queued_samples == 3
    for _ in range(3):
        model.gate.release()
    blocker.result(timeout=5)
    assert queued.result(timeout=5).outputs == [2, 4, 6]
    assert b.submit([5], deadline=1e9) is not None  # the queue drained: accepted again
    model.gate.release()
    b.close()


class ScriptedWait:
    """The batcher's max_wait: records each wait, lets `during` run (lock released), advances the clock."""

    def __init__(self, clock: FakeClock, during=None):
        self.clock = clock
        self.during = during or (lambda: None)
        self.timeouts: list[float] = []

    def __call__(self, cond, timeout_s):
        self.timeouts.append(round(timeout_s, 6))
        cond.release()  # what Condition.wait does while it sleeps: submitters get in
        try:
            self.during()
        finally:
            cond.acquire()
        self.clock.now += timeout_s


def test_max_wait_collects_a_fuller_batch():
    clock = FakeClock()
    seen = []
    wait = ScriptedWait(clock)
    b = Batcher(
        lambda xs: seen.append(list(xs)) or xs, BatchSettings(max_batch_size=3, max_wait_ms=50), clock=clock, wait=wait
    )
    late = []
    wait.during = lambda: late.extend(b.submit([i], deadline=1e9) for i in (1, 2)) if not late else None
    first = b.submit([0], deadline=1e9)
    b.start()
    assert first.result(timeout=5).outputs == [0]
    assert [f.result(timeout=5).outputs for f in late] == [[1], [2]]
    assert seen == [[0, 1, 2]]  # without the wait, [0] would have run alone
    assert wait.timeouts == [0.05]  # it waited once, for the whole max_wait_ms
    b.close()


def test_max_wait_gives_up_after_max_wait_ms():
    clock = FakeClock()
    wait = ScriptedWait(clock)
    b = Batcher(lambda xs: xs, BatchSettings(max_batch_size=8, max_wait_ms=20), clock=clock, wait=wait)
    f = b.submit([7], deadline=1e9)
    b.start()
    res = f.result(timeout=5)
    assert res.outputs == [7] and res.batch_size == 1
    assert wait.timeouts == [0.02] and res.queue_s == pytest.approx(0.02)
    b.close()


@pytest.mark.parametrize(("preferred", "waits"), [(2, 1), (0, 5)])
def test_a_preferred_batch_size_ends_the_wait_early(preferred, waits):
    """The encoder server's --preferred-batch-size: with 2 queued the batch runs at once, where
    max_batch_size (8) alone keeps waiting out max_wait_ms (woken every 10 ms here)."""
    clock = FakeClock()
    timeouts = []
    b = None

    def wait(cond, timeout_s):
        timeouts.append(round(timeout_s, 6))
        if len(timeouts) == 1:
            cond.release()
            try:
                late.append(b.submit([1], deadline=1e9))
            finally:
                cond.acquire()
        clock.now += 0.01  # woken early (a new arrival would notify)

    late = []
    b = Batcher(lambda xs: xs, BatchSettings(max_batch_size=8, max_wait_ms=50, preferred_batch_size=preferred),
                clock=clock, wait=wait)  # fmt: skip
    first = b.submit([0], deadline=1e9)
    b.start()
    assert first.result(timeout=5).batch_size == 2 and late[0].result(timeout=5).outputs == [1]
    assert len(timeouts) == waits
    b.close()


def test_no_wait_by_default():
    clock = FakeClock()
    wait = ScriptedWait(clock)
    b = Batcher(lambda xs: xs, BatchSettings(max_batch_size=8), clock=clock, wait=wait).start()
    assert b.submit([1], deadline=1e9).result(timeout=5).outputs == [1]
    assert wait.timeouts == []
    b.close()


def test_close_drains_the_queue():
    b = Batcher(lambda xs: xs)
    futures = [b.submit([i], deadline=1e9) for i in range(5)]
    b.start()
    b.close(timeout_s=5)
    assert [f.result(timeout=1).outputs for f in futures] == [[i] for i in range(5)]


def test_an_internal_error_fails_the_batch_but_not_the_thread(monkeypatch):
    b = Batcher(lambda xs: xs)
    calls = []

    def broken_account(live, n, seconds):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(b, "_account", broken_account)
    b.start()
    with pytest.raises(Exception, match="internal error in the batcher"):
        b.submit([1], deadline=1e9).result(timeout=5)
    assert b.submit([2], deadline=1e9).result(timeout=5).outputs == [2]
    b.close()


def token_batcher(model, **kw):
    return Batcher(model, sample_len=len, **kw)


def test_token_budget_bounds_rows_times_longest():
    model = GatedModel()
    b = token_batcher(model, settings=BatchSettings(max_batch_size=8, max_batch_tokens=40)).start()
    blocker = b.submit(["x"], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    # ten-token rows: at most 4 fit in 40 padded tokens
    futures = [b.submit(["a" * 10], deadline=1e9) for _ in range(6)]
    for _ in range(3):
        model.gate.release()
    blocker.result(timeout=5)
    [f.result(timeout=5) for f in futures]
    assert [len(batch) for batch in model.batches] == [1, 4, 2]
    assert b.totals.padded_tokens == 1 + 40 + 20 and b.totals.real_tokens == 1 + 60
    b.close()


def test_length_grouping_keeps_padding_low_and_the_oldest_first():
    model = GatedModel()
    b = token_batcher(model, settings=BatchSettings(max_batch_size=2)).start()
    blocker = b.submit(["x"], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    lengths = [50, 3, 48, 4, 2, 47]
    futures = [b.submit(["t" * n], deadline=1e9) for n in lengths]
    for _ in range(4):
        model.gate.release()
    blocker.result(timeout=5)
    assert [f.result(timeout=5).outputs[0] for f in futures] == ["t" * n * 2 for n in lengths]
    batches = [[len(s) for s in batch] for batch in model.batches[1:]]
    # each batch starts with the oldest waiting request and adds the one that adds the least padding
    # (FIFO would give [[50, 3], [48, 4], [2, 47]])
    assert batches == [[50, 48], [3, 4], [2, 47]]
    b.close()


def test_grouping_looks_no_further_than_the_window():
    """Greedy picks come from the first `group_window` queued parts only, so a request cannot be
    overtaken by ones queued far behind it."""
    model = GatedModel()
    b = token_batcher(model, settings=BatchSettings(max_batch_size=2), group_window=2).start()
    blocker = b.submit(["x"], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    futures = [b.submit(["t" * n], deadline=1e9) for n in (50, 5, 50)]
    for _ in range(3):
        model.gate.release()
    blocker.result(timeout=5)
    [f.result(timeout=5) for f in futures]
    batches = [[len(s) for s in batch] for batch in model.batches[1:]]
    # the second 50 would pad best with the first, but it is outside the window: the 5 goes before it
    # (with no window: [[50, 50], [5]])
    assert batches == [[50], [5, 50]]
    b.close()


def test_abandoned_requests_are_not_computed():
    model = GatedModel()
    clock = FakeClock()
    b = Batcher(model, BatchSettings(max_batch_size=4), clock=clock).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    asked = []
    gone = b.submit([1], deadline=1e9, abandoned=lambda: asked.append(1) or True)
    here = b.submit([2], deadline=1e9, abandoned=lambda: asked.append(2) or False)
    clock.now += 0.1  # they waited long enough to be asked
    model.gate.release()
    model.gate.release()
    blocker.result(timeout=5)
    with pytest.raises(Exception, match="client disconnected"):
        gone.result(timeout=5)
    assert here.result(timeout=5).outputs == [4]
    assert model.batches == [[0], [2]] and b.totals.abandoned == 1 and asked == [1, 2]
    b.close()


def test_requests_that_just_arrived_are_not_asked_whether_their_client_left():
    clock = FakeClock()
    b = Batcher(lambda xs: xs, clock=clock, abandoned_after_s=0.05)
    asked = []
    f = b.submit([1], deadline=1e9, abandoned=lambda: asked.append(1) or True)
    b.start()
    assert f.result(timeout=5).outputs == [1] and asked == []  # no system call for a fresh request
    b.close()


class RecordingObserver:
    """Collects what the batcher reports, as metrics.BatchMetrics would."""

    def __init__(self):
        self.events = []

    def batch(self, samples, real, padded, seconds):
        self.events.append(("batch", samples, real, padded))

    def queue_depth(self, samples):
        self.events.append(("depth", samples))

    def dropped(self, reason):
        self.events.append(("dropped", reason))


def test_observer_sees_batches_depth_and_drops():
    obs = RecordingObserver()
    clock = FakeClock()
    b = Batcher(lambda xs: xs, sample_len=len, max_queue_samples=2, observer=obs, clock=clock)
    ok = b.submit(["ab", "abcd"], deadline=1e9)
    with pytest.raises(Overloaded):
        b.submit(["x"], deadline=1e9)
    b.start()
    ok.result(timeout=5)
    late = b.submit(["x"], deadline=clock.now - 1)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=5)
    b.close()
    assert ("batch", 2, 6, 8) in obs.events
    assert ("dropped", "overloaded") in obs.events and ("dropped", "deadline") in obs.events
    depths = [e[1] for e in obs.events if e[0] == "depth"]
    assert depths[0] == 2 and depths[-1] == 0


def test_expired_and_rejected_are_counted():
    clock = FakeClock()
    b = Batcher(lambda xs: xs, max_queue_samples=1, clock=clock)
    late = b.submit([1], deadline=clock.now - 1)
    with pytest.raises(Overloaded):
        b.submit([2], deadline=1e9)
    b.start()
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=5)
    b.close()
    assert (b.totals.expired, b.totals.rejected) == (1, 1)


def test_a_request_larger_than_the_queue_is_413_not_429():
    b = Batcher(lambda xs: xs, max_queue_samples=8)
    with pytest.raises(LimitExceeded, match="larger than model 'model''s queue") as info:
        b.submit(list(range(9)), deadline=1e9)
    assert info.value.status_code == 413 and b.totals.rejected == 0
    b.close()


def test_a_cancel_during_the_batch_fails_no_request():
    """A request thread cancelling (its deadline passed) while its batch runs: the futures are
    running by then, so the cancel is refused and every result still lands."""
    model = GatedModel()
    b = Batcher(model, BatchSettings(max_batch_size=4)).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    futures = [b.submit([i], deadline=1e9) for i in (1, 2, 3)]
    model.gate.release()
    assert model.entered.acquire(timeout=5)  # the batch [1, 2, 3] is inside the model now
    assert [f.cancel() for f in futures] == [False, False, False]
    model.gate.release()
    blocker.result(timeout=5)
    assert [f.result(timeout=5).outputs for f in futures] == [[2], [4], [6]]
    later = b.submit([5], deadline=1e9)
    model.gate.release()
    assert later.result(timeout=5).outputs == [10]
    b.close()


def test_a_request_cancelled_while_queued_is_skipped():
    model = GatedModel()
    b = Batcher(model, BatchSettings(max_batch_size=4)).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    gone, kept = b.submit([1], deadline=1e9), b.submit([2], deadline=1e9)
    assert gone.cancel()
    model.gate.release()
    model.gate.release()
    blocker.result(timeout=5)
    assert kept.result(timeout=5).outputs == [4]
    assert model.batches == [[0], [2]]  # the cancelled request never reached the model
    b.close()


def test_cancel_between_check_and_result_cannot_break_the_batch(monkeypatch):
    """The old race: the batch thread saw a future not done, then a cancel landed before
    set_result, and the InvalidStateError failed the rest of the batch. Force that interleaving:
    cancel every future at the moment the batch thread is about to resolve them."""
    b = Batcher(lambda xs: xs, BatchSettings(max_batch_size=4))
    futures = [b.submit([i], deadline=1e9) for i in range(3)]
    real_account = b._account

    def account_then_cancel(live, n, seconds):
        real_account(live, n, seconds)
        assert [f.cancel() for f in futures] == [False, False, False]

    monkeypatch.setattr(b, "_account", account_then_cancel)
    b.start()
    assert [f.result(timeout=5).outputs for f in futures] == [[0], [1], [2]]
    b.close()


def test_configure_applies_from_the_next_batch_and_never_strands_a_larger_part():
    """New settings (a reload's) replace the old whole, between batches. A request split into parts
    under the old max_batch_size still runs when the new one is smaller: the first part of a batch
    always goes (it used to be left in the queue for ever, and the batch thread spun on it)."""
    model = GatedModel()
    b = Batcher(model, BatchSettings(max_batch_size=4)).start()
    blocker = b.submit([0], deadline=1e9)
    assert model.entered.acquire(timeout=5)
    wide = b.submit([1, 2, 3, 4], deadline=1e9)  # one part of 4 under max_batch_size=4
    b.configure(BatchSettings(max_batch_size=2))
    assert b.settings == BatchSettings(max_batch_size=2)
    later = [b.submit([i], deadline=1e9) for i in (5, 6, 7)]
    for _ in range(4):
        model.gate.release()
    blocker.result(timeout=5)
    assert wide.result(timeout=5).outputs == [2, 4, 6, 8]
    assert [f.result(timeout=5).outputs for f in later] == [[10], [12], [14]]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6], [7]]
    b.close()


def test_batch_settings_are_bounded():
    for bad in ({"max_batch_size": 0}, {"max_batch_tokens": 0}, {"max_wait_ms": -1}, {"max_batch_size": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BatchSettings(**bad)
    assert BatchSettings(max_batch_tokens=None).max_batch_tokens is None

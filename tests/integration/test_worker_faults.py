"""A worker that dies or hangs under load, inside one server (Gunicorn on loopback): the master
replaces it, and the `request_tools` client's retries (inference is idempotent) turn the requests it
held into successes; a hung worker's requests are held for its timeout, not for minutes."""

from __future__ import annotations

import os
import signal
import time

from tests.serverproc import ServerProcess, poll
from tests.steadyload import Load

TIMEOUT_S = 10  # worker_timeout_s: the master kills a worker whose heartbeat is this late (its least)


def replaced(srv: ServerProcess, victim: int, workers: int = 2) -> bool:
    pids = srv.worker_pids()
    return victim not in pids and len(pids) == workers


def test_a_worker_killed_mid_load_is_replaced_and_its_requests_are_retried():
    with ServerProcess(workers=2) as srv, Load(srv.base_url, clients=8) as load:
        victim = srv.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        poll(lambda: replaced(srv, victim), timeout_s=30, every_s=0.05)
        srv.wait_ready(120)  # the replacement loaded its model
        back_s = time.monotonic() - t0
        served = load.ok
        poll(lambda: load.ok >= served + 50, timeout_s=60, every_s=0.05)
    print(f"\nSIGKILL of one of 2 workers: {load.summary()}; replaced and ready in {back_s:.1f} s")
    assert load.failures == [], load.failures[:5]


def test_a_hung_worker_is_killed_at_its_timeout_and_its_requests_are_retried():
    with ServerProcess(workers=2, worker_timeout_s=TIMEOUT_S) as srv, Load(srv.base_url, clients=8) as load:
        victim = srv.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)  # hung: holds its connections, answers nothing, never beats
        t0 = time.monotonic()
        poll(lambda: replaced(srv, victim), timeout_s=TIMEOUT_S + 30, every_s=0.05)
        killed_s = time.monotonic() - t0
        srv.wait_ready(120)
        served = load.ok
        poll(lambda: load.ok >= served + 50, timeout_s=60, every_s=0.05)
    print(f"\nSIGSTOP of one of 2 workers (worker_timeout_s={TIMEOUT_S}): {load.summary()}; "
          f"killed by the master after {killed_s:.1f} s")  # fmt: skip
    assert load.failures == [], load.failures[:5]
    assert TIMEOUT_S <= killed_s < TIMEOUT_S + 5
    # a request held by the hung worker waited for its timeout, then went to the other worker
    assert load.retried >= 1 and load.longest_s < TIMEOUT_S + 10
    assert f"WORKER TIMEOUT (pid:{victim})" in srv.log_tail(10**6)  # the master says why it killed it

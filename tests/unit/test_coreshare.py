"""The cores' share between running batches: all of them alone, a split when others run, across a fork."""

from __future__ import annotations

import os

from binserve.process import coreshare


def test_alone_a_batch_gets_every_core_and_concurrent_ones_split_them():
    with coreshare.share(4, 0) as first:
        assert first == 4
        with coreshare.share(4, 1) as second:
            assert second == 2
            with coreshare.share(4, 2) as third:
                assert third == 1
    with coreshare.share(4, 0) as again:
        assert again == 4  # everything was released


def test_workers_forked_from_one_master_see_each_other(monkeypatch):
    monkeypatch.setattr(coreshare, "_shared", None)
    coreshare.create()  # what gunicorn.conf.py does in the master
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker with a batch running
        try:
            with coreshare.share(2, 1):
                os.write(ready_w, b"x")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        with coreshare.share(2, 0) as mine:
            assert mine == 1  # the other worker computes: one core each
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    with coreshare.share(2, 0) as alone:
        assert alone == 2


def test_a_dead_workers_share_is_cleared(monkeypatch):
    monkeypatch.setattr(coreshare, "_shared", None)
    coreshare.create()
    flags, _ = coreshare._shared
    flags[3] = 1  # worker 3 died in the middle of a batch
    with coreshare.share(2, 0) as n:
        assert n == 1
    coreshare.clear(3)  # the master's child_exit
    with coreshare.share(2, 0) as n:
        assert n == 2

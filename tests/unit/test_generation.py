"""Continuous batching on a tiny random Llama (models/example_causal_lm.py), in process."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from binserve.errors import ClientGone, LimitExceeded, Overloaded
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings, NullObserver, Scheduler
from binserve.scheduling.sequences import SamplingParams, Sequence
from models.example_causal_lm import EXAMPLE_PROMPTS, greedy_reference, write_causal_lm
from tests.serverproc import poll

PROMPTS = EXAMPLE_PROMPTS


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture
def batcher(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 32768), eos_ids=()).start()
    yield b
    b.close()


def reference(lm, prompt: str, n: int) -> list[int]:
    model, tok = lm
    return greedy_reference(model, tok(prompt).input_ids, n, eos=False)


def submit(b, tok, prompt, n, **kw) -> Sequence:
    params = SamplingParams(max_new_tokens=n, temperature=kw.pop("temperature", 0.0), **kw)
    return b.submit_sequence(Sequence(tok(prompt).input_ids, params, time.monotonic() + 60))


def collect(seq: Sequence) -> list:
    return list(seq.stream(60))


def test_concurrent_greedy_equals_generate_alone(lm, batcher):
    _, tok = lm
    lengths = [5, 17, 9, 30, 3, 12, 21, 8]
    seqs = [submit(batcher, tok, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    for seq in seqs:
        collect(seq)
    for seq, p, n in zip(seqs, PROMPTS, lengths, strict=True):
        assert seq.output == reference(lm, p, n), p
        assert seq.finish_reason == "length"
    assert batcher.steps < sum(lengths)  # they shared steps


def test_a_sequence_joining_mid_run_changes_no_one(lm, batcher):
    _, tok = lm
    long = submit(batcher, tok, PROMPTS[1], 40)
    events = long.stream(60)
    for _ in range(10):
        next(events)  # the long one is well under way
    late = submit(batcher, tok, PROMPTS[3], 12)
    rest = list(events)
    collect(late)
    assert len(rest) > 0
    assert long.output == reference(lm, PROMPTS[1], 40)
    assert late.output == reference(lm, PROMPTS[3], 12)


def test_stream_deltas_concatenate_to_the_text(lm, batcher):
    _, tok = lm
    seq = submit(batcher, tok, PROMPTS[0], 20)
    text = "".join(delta for _, _, delta in collect(seq))
    assert text == tok.decode(seq.output, skip_special_tokens=True) == seq.text


def test_stop_sequences_cut_the_text(lm, batcher):
    _, tok = lm
    free = submit(batcher, tok, PROMPTS[1], 30)
    collect(free)
    stop = free.text[8:11]  # a piece of what it writes anyway
    seq = submit(batcher, tok, PROMPTS[1], 30, stop=(stop,))
    text = "".join(d for _, _, d in collect(seq))
    assert seq.finish_reason == "stop" and text == free.text[: free.text.find(stop)] and stop not in text


def test_seeded_sampling_is_deterministic_and_differs_by_seed(lm, batcher):
    _, tok = lm
    runs = [submit(batcher, tok, PROMPTS[2], 24, temperature=1.0, top_p=0.9, top_k=50, seed=s) for s in (1, 1, 2)]
    for seq in runs:
        collect(seq)
    assert runs[0].output == runs[1].output != runs[2].output


def test_eos_ends_a_sequence_with_stop(lm):
    model, tok = lm
    greedy = reference(lm, PROMPTS[0], 6)
    b = ContinuousBatcher(model, tok, torch.device("cpu"), eos_ids=(greedy[3],)).start()  # its 4th token as EOS
    try:
        seq = submit(b, tok, PROMPTS[0], 6)
        collect(seq)
        assert seq.output == greedy[:3] and seq.finish_reason == "stop"
    finally:
        b.close()


def test_a_cancelled_sequence_stops_at_the_next_step(lm, batcher):
    _, tok = lm
    seq = submit(batcher, tok, PROMPTS[1], 500)
    events = seq.stream(60)
    next(events)
    seq.cancel()
    with pytest.raises(ClientGone):
        list(events)
    assert len(seq.output) < 500
    # the consumer may see ClientGone before the batch thread has dropped the row: poll for it
    assert poll(lambda: batcher.counts() == (0, 0), timeout_s=10)


def test_bounds(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 64), max_waiting=1)
    with pytest.raises(LimitExceeded, match="cache"):
        submit(b, tok, PROMPTS[0], 100)
    submit(b, tok, PROMPTS[0], 4)  # not started: it waits
    with pytest.raises(Overloaded):
        submit(b, tok, PROMPTS[0], 4)
    two = [(tok(PROMPTS[0]).input_ids, SamplingParams(4))] * 2
    with pytest.raises(LimitExceeded, match="queues at most 1"):
        b.submit(two, time.monotonic() + 10)  # more prompts than could ever wait at once


def test_leaving_rows_take_their_padding_with_them(lm):
    """A long prompt that finishes first leaves only padding before the short one's tokens: trimmed."""
    model, tok = lm
    widths = []

    class Watch(NullObserver):
        def counts(self, running, waiting):
            if b._mask is not None and running == 1:
                widths.append((b._mask.shape[1], b._running[0].cache_len))

    b = ContinuousBatcher(model, tok, torch.device("cpu"), observer=Watch())
    long_prompt = submit(b, tok, PROMPTS[3], 2)
    short = submit(b, tok, PROMPTS[0], 30)
    b.start()
    try:
        collect(long_prompt)
        collect(short)
    finally:
        b.close()
    assert short.output == reference(lm, PROMPTS[0], 30)
    assert widths and all(width == cached for width, cached in widths)


def test_text_held_back_for_stop_strings_is_sent_at_eos(lm):
    model, tok = lm
    greedy = reference(lm, PROMPTS[1], 12)
    end = next(i for i in range(3, 12) if greedy[i] not in greedy[:i])  # a token it has not written before
    b = ContinuousBatcher(model, tok, torch.device("cpu"), eos_ids=(greedy[end],)).start()
    try:
        seq = submit(b, tok, PROMPTS[1], 12, stop=("never appears in this text",))
        text = "".join(d for _, _, d in collect(seq))
        assert seq.finish_reason == "stop" and text == tok.decode(greedy[:end], skip_special_tokens=True)
    finally:
        b.close()


def test_whole_generations_through_the_batcher_interface(lm, batcher):
    _, tok = lm
    prompts = [tok(p).input_ids for p in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=7, temperature=0.0)
    result = batcher.submit([(p, params) for p in prompts], time.monotonic() + 60).result(60)
    assert [o["output_ids"] for o in result.outputs] == [reference(lm, p, 7) for p in PROMPTS[:3]]
    assert all(o["finish_reason"] == "length" for o in result.outputs)
    doomed = batcher.submit([(prompts[0], SamplingParams(max_new_tokens=1000, temperature=0.0))], time.monotonic() + 60)
    doomed.cancel()  # the request gave up: its sequence stops at the next step
    deadline = time.monotonic() + 30
    while batcher.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the loop's own counts
    assert batcher.counts() == (0, 0) and batcher.generated < 7 * 3 + 500  # not the 1000 it asked for


def test_settings_swap_between_steps_and_a_waiting_sequence_that_no_longer_fits_is_413(lm):
    """The continuous batcher is a Scheduler like the request batcher: its bounds are one
    BatchSettings swapped whole; admission reads them each step."""
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(4, 256))
    assert isinstance(b, Scheduler) and b.settings == BatchSettings(4, 256)
    big = submit(b, tok, PROMPTS[0], 100)  # fits 256 cache tokens; waits (the loop is not started)
    small = submit(b, tok, PROMPTS[0], 4)
    b.configure(BatchSettings(4, 64))
    b.start()
    try:
        with pytest.raises(LimitExceeded, match="64-token cache"):
            collect(big)
        collect(small)
    finally:
        b.close()
    assert small.output == reference(lm, PROMPTS[0], 4)
    stats = b.stats()
    assert stats["sequences"] == 1 and stats["running"] == stats["waiting"] == stats["reserved_cache_tokens"] == 0
    with pytest.raises(ValueError, match="max_batch_tokens"):
        b.configure(BatchSettings(4, None))


def _penalized_reference(lm, ids: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy with OpenAI's presence/frequency penalties, by a full forward per token (no cache)."""
    model, _ = lm
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            for token in set(out):
                logits[token] -= presence + frequency * out.count(token)
            out.append(int(logits.argmax()))
    return out


def test_the_repetition_penalty_is_hugging_faces(lm, batcher):
    model, tok = lm
    seqs = [submit(batcher, tok, p, 24, repetition_penalty=1.5) for p in PROMPTS[:4]]
    for seq in seqs:
        collect(seq)
    for seq, p in zip(seqs, PROMPTS[:4], strict=False):
        t = torch.tensor([tok(p).input_ids])
        with torch.no_grad():
            ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=24, do_sample=False,
                                 repetition_penalty=1.5, eos_token_id=None)  # fmt: skip
        assert seq.output == ref[0, t.shape[1] :].tolist(), p
    assert seqs[0].output != reference(lm, PROMPTS[0], 24)  # the penalty changed what greedy makes


def test_presence_and_frequency_penalties_are_openais(lm, batcher):
    _, tok = lm
    plain = submit(batcher, tok, PROMPTS[1], 24)
    penalized = submit(batcher, tok, PROMPTS[1], 24, presence_penalty=0.8, frequency_penalty=1.2)
    collect(plain), collect(penalized)
    assert penalized.output == _penalized_reference(lm, tok(PROMPTS[1]).input_ids, 24, 0.8, 1.2)
    assert penalized.output != plain.output
    assert len(set(penalized.output)) > len(set(plain.output))  # fewer repeats


def test_penalize_matches_hugging_faces_processor_value_for_value():
    from transformers import RepetitionPenaltyLogitsProcessor

    from binserve.scheduling.continuous import penalize

    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 0.0])
    seq = Sequence([1, 3], SamplingParams(repetition_penalty=1.7), time.monotonic() + 60)
    seq.output = [3, 4, 4]
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[1, 3, 3, 4, 4]]), logits[None].clone())[0]
    torch.testing.assert_close(penalize(logits, seq), ref)
    seq = Sequence([1], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), time.monotonic() + 60)
    seq.output = [4, 4, 2]
    torch.testing.assert_close(penalize(logits, seq), torch.tensor([2.0, -1.0, -0.25, -3.0, 3.0, 0.0]))


def test_sequences_with_one_prompt_share_its_prefill_and_stay_exact(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 32768), eos_ids=())
    forwards = []
    real = b._forward
    b._forward = lambda **kw: forwards.append(kw["input_ids"].shape) or real(**kw)
    ids = tok(PROMPTS[2]).input_ids
    seqs = [b.submit_sequence(Sequence(ids, SamplingParams(9, temperature=0.0), time.monotonic() + 60))
            for _ in range(3)]  # fmt: skip
    b.start()  # all three are waiting when the loop starts: they join in one step
    try:
        for seq in seqs:
            collect(seq)
    finally:
        b.close()
    assert all(seq.output == reference(lm, PROMPTS[2], 9) for seq in seqs)
    assert sum(1 for shape in forwards if shape[1] == len(ids)) == 1  # one prefill of the prompt


def test_newcomers_of_a_step_prefill_in_one_padded_forward_and_stay_exact(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 32768), eos_ids=())
    shapes = []
    real = b._forward
    b._forward = lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or real(**kw)
    lengths = [5, 17, 9, 30, 3, 12, 21, 8]
    seqs = [b.submit_sequence(Sequence(tok(p).input_ids, SamplingParams(n, temperature=0.0), time.monotonic() + 60))
            for p, n in zip(PROMPTS, lengths, strict=True)]  # fmt: skip
    b.start()  # all eight wait when the loop starts: one step takes them all
    try:
        for seq in seqs:
            collect(seq)
    finally:
        b.close()
    for seq, p, n in zip(seqs, PROMPTS, lengths, strict=True):
        assert seq.output == reference(lm, p, n), p
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(8, max(len(tok(p).input_ids) for p in PROMPTS))]  # one forward, padded to the longest

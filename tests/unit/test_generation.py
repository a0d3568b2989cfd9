"""Continuous batching on a tiny random Llama (models/examples/causal_lm.py), in process."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from binserve.errors import ClientGone, LimitExceeded, Overloaded
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings, NullObserver, Scheduler
from binserve.scheduling.sequences import SamplingParams, Sequence
from models.examples.causal_lm import EXAMPLE_PROMPTS, greedy_reference, write_causal_lm
from tests.serverproc import poll

PROMPTS = EXAMPLE_PROMPTS


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The tiny Llama with its attention sharpened: at random init every query sees its keys
    about equally, so a cache that loses or misplaces keys would still give the same tokens."""
    path = write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model, AutoTokenizer.from_pretrained(path)


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


@pytest.mark.parametrize(
    "params", [{"top_p": 5e-324}, {"temperature": 5e-324}, {"temperature": 1e-7, "top_p": 1e-30, "seed": 3}]
)
def test_the_smallest_temperature_or_top_p_samples_the_likeliest_token(lm, batcher, params):
    """Found by the fuzzing (tests/fuzz): top_p under float32's range dropped every token and a
    temperature near 0 made the logits inf; both failed the whole step. In the limit both are greedy."""
    _, tok = lm
    seq = submit(batcher, tok, PROMPTS[1], 12, **{"temperature": 1.0, **params})
    collect(seq)
    assert seq.output == reference(lm, PROMPTS[1], 12)


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


def test_a_sequence_whose_client_left_is_dropped_by_the_batch_thread_alone(lm, batcher):
    """The socket check on its own: nobody reads the stream or cancels it; the batch thread asks
    the sequence's `abandoned` check (the request's socket) and ends it, freeing its row."""
    _, tok = lm
    left = threading.Event()
    params = SamplingParams(max_new_tokens=500, temperature=0.0)
    seq = batcher.submit_sequence(Sequence(tok(PROMPTS[1]).input_ids, params, time.monotonic() + 60, left.is_set))
    poll(lambda: len(seq.output) >= 2, timeout_s=30, every_s=0.01)
    left.set()  # the client hung up
    poll(lambda: seq.finish_reason is not None, timeout_s=30, every_s=0.01)
    assert seq.finish_reason == "cancelled" and len(seq.output) < 500
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


def test_rows_that_end_free_their_slots_at_once_and_the_cache_is_written_in_place(lm):
    """The KV cache is preallocated slots: a finished row's slot is taken by the last row (the
    others stay where they are), and a decode step writes into the same buffers, never a new one."""
    model, tok = lm
    seen = []  # per step: (slots of the running rows, the first layer's key buffer address)

    class Watch(NullObserver):
        def counts(self, running, waiting):
            if b.cache.keys:
                seen.append(([(s.slot, len(s.output)) for s in b._rows], b.cache.keys[0].data_ptr()))

    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 4096), eos_ids=(), observer=Watch())
    seqs = [submit(b, tok, p, n) for p, n in zip(PROMPTS[:4], [3, 30, 12, 20], strict=True)]
    b.start()
    try:
        for seq in seqs:
            collect(seq)
    finally:
        b.close()
    for seq, p, n in zip(seqs, PROMPTS[:4], [3, 30, 12, 20], strict=True):
        assert seq.output == reference(lm, p, n), p
    # the 3-token one left first: the last row (the 20-token one) took its slot 0
    after = next(slots for slots, _ in seen if len(slots) == 3)
    assert sorted(slot for slot, _ in after) == [0, 1, 2] and after[0][0] == 0
    assert b._rows == [] and b.cache.used == 0
    assert len({ptr for _, ptr in seen}) == 1  # one buffer all along: nothing concatenated
    assert b.stats()["cache_tokens"] == 16 * 64  # 16 slots of the longest reservation (30 + prompt), rounded up


def test_the_budget_counts_rows_times_the_longest_reservation(lm):
    model, tok = lm
    most = []

    class Watch(NullObserver):
        def counts(self, running, waiting):
            most.append(running)

    # each reserves prompt + 100 tokens: rows of 128 columns, so a 256-token cache runs two at a time
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 256), eos_ids=(), observer=Watch())
    seqs = [submit(b, tok, PROMPTS[i], 100) for i in (0, 2, 4)]
    b.start()
    try:
        for seq in seqs:
            collect(seq)
    finally:
        b.close()
    assert max(most) == 2
    for seq, i in zip(seqs, (0, 2, 4), strict=True):
        assert seq.output == reference(lm, PROMPTS[i], 100)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_generating(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 4096), eos_ids=(), prefill_chunk=8)
    fed = []  # query tokens per forward
    real = b._forward
    b._forward = lambda **kw: fed.append(kw["input_ids"].shape[1]) or real(**kw)
    b.start()
    try:
        running = submit(b, tok, PROMPTS[0], 40)
        events = running.stream(60)
        next(events)
        long_ids = tok(" ".join(PROMPTS)).input_ids  # ~60 tokens: 8 steps of 8
        long = b.submit_sequence(Sequence(long_ids, SamplingParams(5, temperature=0.0), time.monotonic() + 60))
        list(events)
        collect(long)
    finally:
        b.close()
    assert max(fed) <= 8  # no forward fed more than the chunk
    assert sum(n for n in fed if n > 1) >= len(long_ids) - 8  # the long prompt went in pieces
    assert running.output == reference(lm, PROMPTS[0], 40)
    assert long.output == greedy_reference(model, long_ids, 5, eos=False)


def test_a_shared_prompt_prefix_is_computed_once(lm):
    model, tok = lm
    system = tok(" ".join(PROMPTS[:6])).input_ids  # the part every request starts with
    assert len(system) >= 2 * 16
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 4096), eos_ids=())
    b.start()
    try:
        prompts = [system + tok(p).input_ids for p in PROMPTS[5:8]]
        unrelated = tok(" ".join(reversed(PROMPTS))).input_ids
        outs = []
        for ids in prompts:  # one after the other: each finds what the ones before stored
            seq = b.submit_sequence(Sequence(ids, SamplingParams(8, temperature=0.0), time.monotonic() + 60))
            collect(seq)
            outs.append((seq.output, seq.reused))
            # another prompt in between takes the same slot: what is reused must come from the store
            other = b.submit_sequence(Sequence(unrelated, SamplingParams(8, temperature=0.0), time.monotonic() + 60))
            collect(other)
    finally:
        b.close()
    shared = len(system) // 16 * 16  # whole blocks
    assert [reused for _, reused in outs] == [0, shared, shared]
    stats = b.stats()  # the unrelated prompt found itself the second and third time
    own = (len(unrelated) - 1) // 16 * 16
    assert stats["prefix_hits"] == 4 and stats["prefix_reused_tokens"] == 2 * shared + 2 * own
    assert stats["prefill_tokens"] == sum(map(len, prompts)) + 3 * len(unrelated) - stats["prefix_reused_tokens"]
    for ids, (out, _) in zip(prompts, outs, strict=True):
        assert out == greedy_reference(model, ids, 8, eos=False)  # reused KV, same tokens


def test_the_prefix_store_finds_the_longest_block_and_evicts_the_oldest():
    from binserve.scheduling.prefixes import BLOCK, PrefixStore

    store = PrefixStore(capacity=4 * BLOCK)
    a = list(range(3 * BLOCK + 5))
    assert store.usable(a) == 3 * BLOCK and store.find(a) == (None, 0)
    store.add(a, ["kv-a"])
    kv, n = store.find(a[: 2 * BLOCK] + [999] * 20)  # shares two blocks, then differs
    assert kv == ["kv-a"] and n == 2 * BLOCK
    assert store.find([999] + a[1:]) == (None, 0)  # differs in the first token: nothing
    assert not store.wants(a, 3 * BLOCK) and store.wants(a[: 2 * BLOCK] + [7] * 40, 2 * BLOCK)
    b = [5000 + i for i in range(2 * BLOCK + 1)]
    store.add(b, ["kv-b"])  # 3 + 2 blocks > 4: the oldest (a) goes
    assert store.tokens == 2 * BLOCK and store.find(a) == (None, 0) and store.find(b) == (["kv-b"], 2 * BLOCK)
    assert PrefixStore(0).usable(a) == 0  # a store of no tokens stores nothing


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

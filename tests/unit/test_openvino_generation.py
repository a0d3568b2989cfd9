"""Generation on OpenVINO GenAI (binserve/scheduling/openvino_genai.py) against binserve's own loop,
on a tiny random Llama exported by the real export environment (`make openvino-genai`, which
`make test` installs). Not skipped when that is missing: a backend that does not install fails here."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from binserve.engines.genai_export import export_for_genai, export_python
from binserve.engines.generation import greedy
from binserve.engines.settings import RuntimeSettings
from binserve.errors import InvalidInput
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings, Scheduler
from binserve.scheduling.openvino_genai import OpenVINOGenerator
from binserve.scheduling.sequences import SamplingParams, Sequence
from models.examples.causal_lm import EXAMPLE_PROMPTS, write_causal_lm
from models.registry import AdapterOptions, ModelSpec, load_model

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)
    cache = tmp_path_factory.mktemp("cache")
    return path, export_for_genai(path, str(cache), export_python()), cache


@pytest.fixture(scope="module")
def loop(exported):
    path = exported[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    b = ContinuousBatcher(model, tok, torch.device("cpu"), BatchSettings(16, 32768), eos_ids=()).start()
    yield b, tok
    b.close()


@pytest.fixture(scope="module")
def engine(exported, loop):
    g = OpenVINOGenerator(exported[1], loop[1], BatchSettings(16, 32768), precision="fp32", threads=2).start()
    yield g
    g.close()


def run(backend, tok, prompt: str, **params) -> Sequence:
    seq = backend.submit_sequence(
        Sequence(tok(prompt).input_ids, SamplingParams(**params), time.monotonic() + 60)
    )  # fmt: skip
    events = list(seq.stream(60))
    assert "".join(e[2] for e in events) == seq.text  # the deltas add up to the text
    return seq


def test_concurrent_greedy_tokens_equal_the_loops_in_fp32(loop, engine):
    _, tok = loop
    prompts = [tok(p).input_ids for p in EXAMPLE_PROMPTS]
    assert isinstance(engine, Scheduler)
    assert greedy(engine, prompts, 24) == greedy(loop[0], prompts, 24)
    assert engine.stats()["backend_type"] == "openvino-genai" and engine.stats()["running"] == 0


def test_text_stop_strings_and_finish_reasons_match_the_loop(loop, engine):
    b, tok = loop
    alone = run(b, tok, EXAMPLE_PROMPTS[1], max_new_tokens=20, temperature=0.0)
    stop = alone.text[6:9]  # a string the greedy text will reach
    for kw in ({"max_new_tokens": 20}, {"max_new_tokens": 20, "stop": (stop,)}, {"max_new_tokens": 3}):
        ours, theirs = run(b, tok, EXAMPLE_PROMPTS[1], temperature=0.0, **kw), run(
            engine, tok, EXAMPLE_PROMPTS[1], temperature=0.0, **kw
        )
        assert (theirs.text, theirs.finish_reason, theirs.output) == (ours.text, ours.finish_reason, ours.output)
    stopped = run(engine, tok, EXAMPLE_PROMPTS[1], max_new_tokens=20, temperature=0.0, stop=(stop,))
    assert stopped.finish_reason == "stop" and stop not in stopped.text


def test_eos_ends_a_sequence_as_the_loop_does(exported, loop):
    b, tok = loop
    first = run(b, tok, EXAMPLE_PROMPTS[0], max_new_tokens=8, temperature=0.0).output
    g = OpenVINOGenerator(exported[1], tok, BatchSettings(16, 32768), eos_ids=(first[3],), threads=2).start()
    try:
        seq = run(g, tok, EXAMPLE_PROMPTS[0], max_new_tokens=8, temperature=0.0)
    finally:
        g.close()
    assert (seq.output, seq.finish_reason) == (first[:3], "stop")


def test_seeded_sampling_repeats_unseeded_does_not_and_chosen_logprobs_match_the_loop(loop, engine):
    b, tok = loop
    a, c = (run(engine, tok, EXAMPLE_PROMPTS[2], max_new_tokens=12, temperature=0.9, seed=5) for _ in range(2))
    assert a.output == c.output and len(a.output) == 12
    free = [run(engine, tok, EXAMPLE_PROMPTS[2], max_new_tokens=12, temperature=0.9).output for _ in range(3)]
    assert len({tuple(f) for f in free}) > 1  # the engine's own default seed is the same for every request
    ours = run(b, tok, EXAMPLE_PROMPTS[2], max_new_tokens=6, temperature=0.0, logprobs=0)
    theirs = run(engine, tok, EXAMPLE_PROMPTS[2], max_new_tokens=6, temperature=0.0, logprobs=0)
    assert theirs.output == ours.output
    assert [lp for lp, _ in theirs.logprobs] == pytest.approx([lp for lp, _ in ours.logprobs], abs=1e-4)


def test_what_the_engine_cannot_do_is_refused_when_queued(loop, engine):
    _, tok = loop
    with pytest.raises(InvalidInput, match="chosen token.s logprob only"):
        engine.submit_sequence(
            Sequence(tok("Hello").input_ids, SamplingParams(4, 0.0, logprobs=2), time.monotonic() + 60)
        )  # fmt: skip
    assert engine.counts() == (0, 0)


def test_a_cancelled_sequence_stops_and_the_others_go_on(loop, engine):
    _, tok = loop
    long = engine.submit_sequence(
        Sequence(tok("Hello").input_ids, SamplingParams(200, 0.0), time.monotonic() + 60)
    )  # fmt: skip
    next(long.stream(60))
    long.cancel()
    with pytest.raises(Exception, match="went away"):
        list(long.stream(60))
    assert len(long.output) < 200
    assert len(run(engine, tok, "The cat", max_new_tokens=5, temperature=0.0).output) == 5
    assert engine.counts() == (0, 0) and engine.stats()["reserved_cache_tokens"] == 0


def _adapter(path, cache, **runtime):
    options = AdapterOptions(runtime=RuntimeSettings(cache_dir=str(cache), **runtime))
    lm = load_model(ModelSpec("lm", "hf_causal_lm", str(path)), torch.device("cpu"), options)
    lm.warmup()
    return lm


def test_the_adapter_picks_openvino_after_its_check_and_says_so(exported):
    path, _, cache = exported
    lm = _adapter(path, cache, generation_backend="openvino", precision="fp32")
    runtime = lm.describe()["runtime"]
    assert runtime["backend_type"] == "openvino-genai" and lm.describe()["engines"] == ["openvino-genai-fp32"]
    gen = lm.continuous_batcher(BatchSettings(4, 4096)).start()
    try:
        assert isinstance(gen, OpenVINOGenerator)
    finally:
        gen.close()


def test_without_an_export_environment_auto_falls_back_and_openvino_fails_the_load(exported, tmp_path):
    path, _, cache = exported
    lm = _adapter(path, cache, generation_backend="auto", export_python=str(tmp_path / "no-python"))
    assert lm.describe()["runtime"]["backend_type"] == "binserve-loop"
    assert "no OpenVINO export environment" in lm.describe()["runtime"]["backend_note"]
    with pytest.raises(RuntimeError, match="generation_backend=openvino is not available"):
        _adapter(path, cache, generation_backend="openvino", export_python=str(tmp_path / "no-python"))


def test_the_check_measures_how_far_an_engines_tokens_are_from_the_fp32_best(exported, loop, engine):
    from binserve.engines.generation import TOLERANCE, max_gap, passes

    path = exported[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    _, tok = loop
    prompts = [tok(p).input_ids for p in EXAMPLE_PROMPTS[:4]]
    own = greedy(engine, prompts, 12)
    assert max_gap(model, prompts, own) <= TOLERANCE["fp32"]
    with torch.no_grad():  # each position's least likely token: what a broken engine could pick
        logits = [model(torch.tensor([p + o])).logits[0, len(p) - 1 : -1] for p, o in zip(prompts, own, strict=True)]
    worst = [step.argmin(-1).tolist() for step in logits]
    gap = max_gap(model, prompts, worst)
    assert gap > 1.0 and not passes("bf16", gap) and not passes("fp32", gap)


def test_bf16_is_never_tried_on_one_thread_where_openvino_crashes(exported, loop):
    """OpenVINO 2026.4's bf16 pipeline dies of SIGFPE on one thread: the plan leaves it out there,
    and asking for it is a ValueError, not a dead worker."""
    from binserve.engines.generation import candidates

    assert candidates("auto", True, 2) == ["bf16", "fp32"]
    assert candidates("auto", True, 1) == ["fp32"] and candidates("auto", False, 8) == ["fp32"]
    with pytest.raises(ValueError, match="bf16 needs 2 threads"):
        OpenVINOGenerator(exported[1], loop[1], BatchSettings(4, 4096), precision="bf16", threads=1)
    one = OpenVINOGenerator(exported[1], loop[1], BatchSettings(4, 4096), precision="fp32", threads=1).start()
    try:
        assert len(run(one, loop[1], "Hello", max_new_tokens=4, temperature=0.0).output) == 4
    finally:
        one.close()

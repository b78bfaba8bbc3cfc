"""The batching engine against plain generate(): same tokens alone, in a batch, joining mid-flight, after cancels."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from qwen.engine import PREFILL_TOKEN_BUDGET, GenerationEngine, RequestHandle, SamplingParams, TextAssembler
from qwen.qwen_generation_utils import make_context
from support import STOP_IDS, greedy_reference


def greedy(max_new_tokens: int = 12, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, stop_token_ids=STOP_IDS, **extra)


def prompt(tokenizer, query: str) -> list[int]:
    return make_context(tokenizer, query, system="You are a helpful assistant.")[1]


def collect(handle) -> tuple[list[int], str, str]:
    tokens, text, reason = [], "", None
    for event in handle:
        tokens += event.token_ids
        text += event.text
        reason = event.finish_reason or reason
    return tokens, text, reason


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tokenizer):
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=3)
    yield engine
    engine.close()


QUERIES = ["你好", "Tell me a long story about a dragon and a knight.", "1+1=?", "Write Python code.", "晚安"]


def test_one_request_gives_the_generate_tokens(engine, tiny_chat_model, tokenizer):
    ids = prompt(tokenizer, QUERIES[0])
    tokens, text, reason = collect(engine.submit(ids, greedy(12)))
    expected = greedy_reference(tiny_chat_model, tokenizer, ids, 12)
    assert tokens == expected
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reason == ("length" if len(expected) == 12 else "stop")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_quantization", [False, True])
def test_on_cuda_concurrent_requests_each_match_generate(tiny_chat_dir, tokenizer, cache_quantization):
    # fp32, so that a batched step and generate()'s single row pick the same argmax; on CUDA the engine's slot cache,
    # masks and sampling state live on the GPU.
    from qwen import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir, dtype=torch.float32, device_map="cuda",
                                            use_cache_quantization=cache_quantization).eval()
    cuda_engine = GenerationEngine(model, tokenizer, max_batch_size=3)
    try:
        prompts = [prompt(tokenizer, q) for q in QUERIES]
        handles = [cuda_engine.submit(ids, greedy(10 + i)) for i, ids in enumerate(prompts)]  # 5 requests, 3 slots
        for i, (ids, handle) in enumerate(zip(prompts, handles)):
            tokens, _, _ = collect(handle)
            assert tokens == greedy_reference(model, tokenizer, ids, 10 + i), QUERIES[i]
    finally:
        cuda_engine.close()


def test_concurrent_requests_beyond_the_batch_limit_each_match_alone(engine, tiny_chat_model, tokenizer):
    prompts = [prompt(tokenizer, q) for q in QUERIES]
    handles = [engine.submit(ids, greedy(10 + i)) for i, ids in enumerate(prompts)]  # 5 requests, 3 slots
    for i, (ids, handle) in enumerate(zip(prompts, handles)):
        tokens, _, _ = collect(handle)
        assert tokens == greedy_reference(tiny_chat_model, tokenizer, ids, 10 + i), QUERIES[i]


class HeldRequest:
    """A request whose events are taken on the engine thread, which it holds (mid-reply, between two decode steps'
    tokens) from its third token until `release()`: what the test submits meanwhile waits for the same next step."""

    def __init__(self, engine: GenerationEngine, ids: list[int], params: SamplingParams) -> None:
        self.tokens: list[int] = []
        self.held, self.released, self.finished = threading.Event(), threading.Event(), threading.Event()
        engine.submit(ids, params, on_event=self._on_event)
        assert self.held.wait(60), "the request never reached its third token"

    def _on_event(self, event) -> None:
        self.tokens += event.token_ids
        if len(self.tokens) == 3 and not self.held.is_set():
            self.held.set()
            self.released.wait(60)
        if event.finish_reason is not None:
            self.finished.set()

    def release(self) -> list[int]:
        """Let the engine go on; the request's tokens once it has finished."""
        self.released.set()
        assert self.finished.wait(60)
        return self.tokens


def test_a_request_joins_a_running_batch(engine, tiny_chat_model, tokenizer):
    long_ids, short_ids = prompt(tokenizer, QUERIES[1]), prompt(tokenizer, QUERIES[2])
    first = HeldRequest(engine, long_ids, greedy(40))  # decoding now
    before = engine.counters()
    second = engine.submit(short_ids, greedy(8))
    assert first.release() == greedy_reference(tiny_chat_model, tokenizer, long_ids, 40)
    second_tokens = collect(second)[0]
    assert second_tokens == greedy_reference(tiny_chat_model, tokenizer, short_ids, 8)
    done = engine.counters()
    # Each decode step of the second request (all but its first token, which its prefill gave) also decoded one of
    # the first's: the two shared the batch. Had the second waited for a free turn, steps would equal tokens.
    steps, tokens = done.decode_steps - before.decode_steps, done.decoded_tokens - before.decoded_tokens
    assert len(first.tokens) - 3 > len(second_tokens) - 1  # the first outlasts the second
    assert tokens - steps == len(second_tokens) - 1


def test_prompts_arriving_together_are_prefilled_in_one_batch_and_match_alone(engine, tiny_chat_model, tokenizer):
    # Held at its last token, so that all three slots are free at the step after it.
    running = HeldRequest(engine, prompt(tokenizer, QUERIES[1]), greedy(3))
    prompts = [prompt(tokenizer, q) for q in (QUERIES[0], QUERIES[3], "Explain " + QUERIES[1])]
    assert len({len(ids) for ids in prompts}) == 3  # right padding is exercised
    before = engine.counters()
    handles = [engine.submit(ids, greedy(9)) for ids in prompts]  # all queued before the engine's next step
    running.release()
    for ids, handle in zip(prompts, handles):
        assert collect(handle)[0] == greedy_reference(tiny_chat_model, tokenizer, ids, 9)
    done = engine.counters()
    assert (done.prefill_forwards - before.prefill_forwards, done.prefilled_prompts - before.prefilled_prompts) == (
        1, 3)


def test_prefill_groups_bound_padding_and_size(engine):
    def handles(*lengths):
        return [RequestHandle([1] * n, greedy(), None) for n in lengths]

    def group_lengths(*lengths):
        return [[len(h.prompt_ids) for h in g] for g in engine._prefill_groups(handles(*lengths))]

    assert group_lengths(30, 20, 25) == [[20, 25, 30]]  # sorted, one forward
    assert group_lengths(10, 100) == [[10], [100]]  # padding 10 -> 100 would double the work
    per_batch = PREFILL_TOKEN_BUDGET // 200
    assert group_lengths(*[200] * (per_batch + 1)) == [[200] * per_batch, [200]]
    assert engine.model.config.use_dynamic_ntk and engine.model.config.seq_length == 256
    assert group_lengths(300, 300) == [[300], [300]]  # NTK scaling is per prompt past seq_length
    assert group_lengths() == []


def test_cancel_frees_the_slot(engine, tokenizer):
    handle = engine.submit(prompt(tokenizer, QUERIES[1]), greedy(500))
    events = iter(handle)
    next(events)
    handle.cancel()
    assert [e.finish_reason for e in events][-1] == "cancelled"
    deadline = time.time() + 5
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_seeded_sampling_repeats_and_prompt_limit(engine, tokenizer):
    ids = prompt(tokenizer, QUERIES[3])
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=7, stop_token_ids=STOP_IDS)
    assert collect(engine.submit(ids, params))[0] == collect(engine.submit(ids, params))[0]
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * engine.max_context, greedy())


def test_text_assembler_holds_back_stop_strings_and_partial_characters(tokenizer):
    text = "Thought: look it up 🙂\nAction: search\nObservation: found"
    ids = tokenizer.encode(text)
    assembler = TextAssembler(tokenizer, ("Observation:",))
    out, stopped = "", False
    for token in ids:
        delta, stopped = assembler.add(token)
        assert "\ufffd" not in delta
        out += delta
        assert not out.endswith("Observ") or stopped
        if stopped:
            break
    assert stopped and out == "Thought: look it up 🙂\nAction: search\n"
    plain = TextAssembler(tokenizer, ("Observation:",))
    pieces = [plain.add(t)[0] for t in tokenizer.encode("Obs is short for observe")]
    assert "".join(pieces) + plain.flush() == "Obs is short for observe"


def test_sampling_params_from_a_generation_config():
    from transformers import GenerationConfig

    released = GenerationConfig(do_sample=True, top_p=0.8, top_k=0, repetition_penalty=1.1, max_new_tokens=512)
    params = SamplingParams.from_generation_config(released, temperature=0.7, seed=3)
    assert (params.do_sample, params.top_p, params.top_k, params.temperature, params.seed) == (True, 0.8, 0, 0.7, 3)
    assert params.repetition_penalty == 1.1 and params.max_new_tokens == 512
    # A configured zero is a value, not "unset": temperature 0 means greedy, top_p 0 is refused.
    assert SamplingParams.from_generation_config(GenerationConfig(do_sample=True, temperature=0.0)).greedy
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config(GenerationConfig(do_sample=True, top_p=0.0))
    assert SamplingParams.from_generation_config(released, top_p=None).top_p == 0.8  # None overrides nothing


def test_cancelling_an_earlier_request_leaves_later_ones_intact(engine, tiny_chat_model, tokenizer):
    first = engine.submit(prompt(tokenizer, QUERIES[1]), greedy(200))
    events = iter(first)
    next(events)
    second_ids = prompt(tokenizer, QUERIES[2])
    second = engine.submit(second_ids, greedy(30))
    second_events = iter(second)
    head = [next(second_events)]  # both are decoding; the second sits in the row after the first
    first.cancel()  # the second moves up a row in the cache
    tokens = [t for e in head + list(second_events) for t in e.token_ids]
    assert tokens == greedy_reference(tiny_chat_model, tokenizer, second_ids, 30)
    list(events)


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("repetition_penalty", float("nan")),
    ("presence_penalty", 3.0), ("frequency_penalty", float("inf")), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("temperature", float("nan")), ("temperature", -1e-45), ("top_k", -1), ("top_p", float("nan")),
    ("max_new_tokens", 0), ("top_k", 2.5), ("seed", 1.5), ("temperature", "0.7"),
])
def test_sampling_values_out_of_bounds_are_refused_naming_the_field(field, value):
    from qwen.chat_turn import SamplingParamError

    with pytest.raises(SamplingParamError, match=field) as raised:
        SamplingParams(**{field: value})
    assert raised.value.field == field


def test_tiny_temperatures_decode_greedily_beside_normal_requests(engine, tiny_chat_model, tokenizer):
    """A temperature of 1e-39 once overflowed the logits to inf and failed every request decoding in its batch."""
    ids = [prompt(tokenizer, q) for q in QUERIES[:3]]
    # Below 0.01 decoding is greedy, as the original server made it (top_k=1 under a temperature of 0.01).
    tiny = [SamplingParams(max_new_tokens=10, temperature=t, seed=1, stop_token_ids=STOP_IDS) for t in (1e-39, 0.0099)]
    handles = [engine.submit(ids[0], tiny[0]), engine.submit(ids[1], greedy(10)), engine.submit(ids[2], tiny[1])]
    results = [collect(h) for h in handles]
    for prompt_ids, (tokens, _, reason) in zip(ids, results):
        assert reason in ("stop", "length")
        assert tokens == greedy_reference(tiny_chat_model, tokenizer, prompt_ids, 10)
    # The extremes of the seed range are seeds a generator takes.
    for seed in (2**64 - 1, -(2**63)):
        params = SamplingParams(max_new_tokens=3, temperature=0.8, seed=seed, stop_token_ids=STOP_IDS)
        assert collect(engine.submit(ids[0], params))[2] in ("stop", "length")


def test_a_failure_in_one_rows_sampling_ends_that_request_alone(engine, tiny_chat_model, tokenizer):
    # Values the checks refuse, forced past them to stand for any fault in one row's sampling (NaN logits from the
    # division, here): the engine must end that request with an error and decode its neighbours unharmed.
    broken = SamplingParams(max_new_tokens=10, temperature=0.7, stop_token_ids=STOP_IDS)
    object.__setattr__(broken, "repetition_penalty", 1e-300)
    ids = [prompt(tokenizer, q) for q in QUERIES[:3]]
    handles = [engine.submit(ids[0], greedy(10)), engine.submit(ids[1], broken), engine.submit(ids[2], greedy(10))]
    (first, _, first_reason), (_, _, broken_reason), (third, _, third_reason) = [collect(h) for h in handles]
    assert broken_reason == "error"
    assert first == greedy_reference(tiny_chat_model, tokenizer, ids[0], 10) and first_reason != "error"
    assert third == greedy_reference(tiny_chat_model, tokenizer, ids[2], 10) and third_reason != "error"


def test_a_consumer_callback_that_raises_cancels_only_its_request(engine, tiny_chat_model, tokenizer):
    def gone(event) -> None:
        raise RuntimeError("Event loop is closed")

    ids = [prompt(tokenizer, q) for q in QUERIES[:2]]
    doomed = engine.submit(ids[0], greedy(40), on_event=gone)
    neighbour = engine.submit(ids[1], greedy(10))
    # A bounded wait: before the fix the raising callback killed the engine thread, and iterating would block forever.
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(collect(neighbour)), daemon=True)
    waiter.start()
    waiter.join(60)
    assert results, "the neighbouring request never finished"
    tokens, _, reason = results[0]
    assert reason != "error" and tokens == greedy_reference(tiny_chat_model, tokenizer, ids[1], 10)
    assert doomed.finished.wait(30) and doomed.cancelled.is_set()


def test_prompt_ids_outside_the_vocabulary_are_refused_at_submit(engine, tokenizer):
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([1, engine.model.config.vocab_size], greedy())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([-1, 5], greedy())


def test_shutdown_ends_running_and_queued_requests_at_once(tiny_chat_model, tokenizer):
    """What the server calls on SIGTERM: every request ends as cancelled after the current step (none runs to its
    length), and nothing more is accepted."""
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=1)
    try:
        ids = prompt(tokenizer, QUERIES[1])
        long = SamplingParams(max_new_tokens=900, do_sample=False)  # no stop ids: nearly the whole context
        handles = [engine.submit(ids, long) for _ in range(3)]
        deadline = time.monotonic() + 60
        while (engine.running, engine.waiting) != (1, 2):
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.01)
        engine.shutdown()
        assert [collect(handle)[2] for handle in handles] == ["cancelled"] * 3
        assert (engine.running, engine.waiting) == (0, 0)
        with pytest.raises(RuntimeError, match="shut down"):
            engine.submit(ids, greedy())
    finally:
        engine.close()

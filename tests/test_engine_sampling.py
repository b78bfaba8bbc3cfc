"""The engine's batched penalties and sampling against the per-row formulas they replaced, written plainly here.

The engine chooses every row's next token in one pass over (rows x vocabulary) tensors. Each test builds a mixed
batch (greedy, sampled, penalised rows side by side) and checks every row against a one-row-at-a-time reference:
the repetition penalty over prompt and reply, presence/frequency over the reply, temperature, then top-k, then
top-p over the sorted distribution.
"""

from __future__ import annotations

import torch

from qwen.engine import (
    BatchSampling,
    SamplingParams,
    TextAssembler,
    apply_penalties,
    next_tokens,
    pick,
    sampling_weights,
    seed_as_int64,
    seeded_uniforms,
)

CPU = torch.device("cpu")


# The reference formulas, one row at a time -------------------------------------------------------------------------


def penalised_row(logits: torch.Tensor, seen: list[int], generated: list[int], params: SamplingParams) -> torch.Tensor:
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and seen:
        index = torch.tensor(sorted(set(seen)))
        chosen = logits[index]
        logits[index] = torch.where(chosen < 0, chosen * params.repetition_penalty, chosen / params.repetition_penalty)
    counts: dict[int, int] = {}
    for token in generated:
        counts[token] = counts.get(token, 0) + 1
    if (params.presence_penalty or params.frequency_penalty) and counts:
        index = torch.tensor(list(counts))
        amounts = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[index] -= params.presence_penalty + params.frequency_penalty * amounts
    return logits


def probabilities_row(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, set[int]]:
    """The distribution a row samples from (float64, zero outside the cut) and the ids whose place inside or outside
    the nucleus is a matter of float32 rounding: their likelier tokens' mass is within 1e-4 of top_p (summing 150k
    float32 probabilities, as the engine did before and does now, errs by that much on a flat distribution)."""
    scaled = logits.double() / params.temperature
    if params.top_k:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    probs = torch.softmax(scaled, dim=-1)
    ambiguous: set[int] = set()
    if params.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=0) - ordered
        keep = before < params.top_p
        keep[0] = True
        ambiguous = set(order[(before - params.top_p).abs() < 1e-4].tolist())
        probs = torch.zeros_like(probs).scatter(0, order, torch.where(keep, ordered, 0.0))
    return probs / probs.sum(), ambiguous


def batch_of(rows: list[tuple[torch.Tensor, SamplingParams]]) -> tuple[torch.Tensor, BatchSampling]:
    return torch.stack([logits for logits, _ in rows]), BatchSampling.of([params for _, params in rows], CPU)


# Penalties ----------------------------------------------------------------------------------------------------------


def test_batched_penalties_match_the_per_row_formulas():
    generator = torch.Generator().manual_seed(0)
    vocab = 500
    rows = [
        (SamplingParams(do_sample=False, repetition_penalty=1.3), [5, 6, 7, 5], [9, 9, 5]),
        (SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4), [1, 2], [3, 3, 3, 4, 2]),
        (SamplingParams(temperature=0.7), [10, 11, 12], [13]),
        (SamplingParams(repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=1.1), [20], [21, 20, 21]),
    ]
    logits = torch.randn(len(rows), vocab, generator=generator) * 3
    batch = BatchSampling.of([params for params, _, _ in rows], CPU)
    # What the engine keeps per row: prompt + reply ids padded by repeating the first id, and the reply's counts.
    width = max(len(prompt) + len(reply) for _, prompt, reply in rows)
    history = torch.tensor([(prompt + reply + [prompt[0]] * width)[:width] for _, prompt, reply in rows])
    counts = torch.zeros(len(rows), vocab)
    for row, (_, _, reply) in enumerate(rows):
        for token in reply:
            counts[row, token] += 1
    penalised = apply_penalties(logits.clone(), batch, history, counts)
    for row, (params, prompt, reply) in enumerate(rows):
        expected = penalised_row(logits[row], prompt + reply, reply, params)
        assert torch.equal(penalised[row], expected), row  # the same float32 operations: bit for bit


# Sampling -----------------------------------------------------------------------------------------------------------


def mixed_rows(vocab: int) -> list[tuple[torch.Tensor, SamplingParams]]:
    generator = torch.Generator().manual_seed(1)

    def logits(scale: float) -> torch.Tensor:
        return torch.randn(vocab, generator=generator) * scale

    return [
        (logits(3.0), SamplingParams(do_sample=False)),
        (logits(0.6), SamplingParams(top_p=0.8)),  # flat, as a random checkpoint's: the nucleus holds most ids
        (logits(4.0), SamplingParams(top_p=0.9, temperature=0.7)),  # peaked: a few dozen ids
        (logits(2.0), SamplingParams(top_k=40, temperature=1.3)),
        (logits(2.0), SamplingParams(top_k=300, top_p=0.5)),
        (logits(1.0), SamplingParams(temperature=0.005)),  # below GREEDY_BELOW_TEMPERATURE: greedy
        (logits(1.5), SamplingParams()),  # no cut at all
        (logits(0.02), SamplingParams(top_p=0.3)),  # nearly uniform: the crossing bucket is crowded
    ]


def test_batched_sampling_distributions_match_the_per_row_formulas():
    vocab = 151936  # the released vocabulary's size, so the nucleus search sees realistic bucket contents
    rows = mixed_rows(vocab)
    logits, batch = batch_of(rows)
    weights, usable = sampling_weights(logits.clone(), batch)
    assert usable.all()
    for row, (row_logits, params) in enumerate(rows):
        if params.greedy:
            continue
        expected, ambiguous = probabilities_row(row_logits, params)
        got = weights[row].double() / weights[row].double().sum()
        support = set(torch.nonzero(got).flatten().tolist())
        expected_support = set(torch.nonzero(expected).flatten().tolist())
        assert support ^ expected_support <= ambiguous, row
        clear = torch.tensor(sorted(expected_support - ambiguous))
        torch.testing.assert_close(got[clear] / got[clear].sum(), expected[clear] / expected[clear].sum(),
                                   rtol=2e-4, atol=1e-9)


def test_next_tokens_greedy_rows_take_the_argmax_and_no_row_depends_on_its_neighbours():
    rows = mixed_rows(20000)
    logits, batch = batch_of(rows)
    uniforms = seeded_uniforms(torch.arange(len(rows)) * 7919, torch.full((len(rows),), 3))
    tokens, usable = next_tokens(logits.clone(), batch, uniforms)
    assert usable.all()
    for row, (row_logits, params) in enumerate(rows):
        alone, _ = next_tokens(row_logits[None].clone(), BatchSampling.of([params], CPU), uniforms[row:row + 1])
        assert int(alone) == int(tokens[row]), row
        if params.greedy:
            assert int(tokens[row]) == int(row_logits.argmax())
        else:
            expected, ambiguous = probabilities_row(row_logits, params)
            assert expected[int(tokens[row])] > 0 or int(tokens[row]) in ambiguous


def test_pick_is_inverse_cdf_sampling_in_vocabulary_order():
    generator = torch.Generator().manual_seed(2)
    weights = torch.rand(6, 1000, generator=generator)
    weights[weights < 0.7] = 0.0  # most ids outside the cut
    weights[5] = 0.0
    weights[5, 999] = 2.5  # the only id with weight is the last one, in a partial chunk
    uniforms = torch.tensor([0.0, 0.25, 0.5, 0.999, 1 - 2.0**-24, 0.5])
    expected = []
    for row in range(6):
        cumulative = torch.cumsum(weights[row].double(), 0)
        target = float(uniforms[row]) * float(cumulative[-1])
        expected.append(int((cumulative <= target).sum()))  # the first id whose running sum passes the target
    assert pick(weights, uniforms).tolist() == expected
    assert all(weights[row, token] > 0 for row, token in enumerate(expected))


def test_sampled_frequencies_follow_the_cut_distribution():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    params = SamplingParams(top_p=0.7)  # ids 1 and 2 hold ~0.72 of the mass together; 1 alone ~0.37
    draws = 4000
    batch = BatchSampling.of([params] * draws, CPU)
    uniforms = seeded_uniforms(torch.full((draws,), 12345), torch.arange(draws))
    tokens, _ = next_tokens(logits.expand(draws, -1).clone(), batch, uniforms)
    frequencies = torch.bincount(tokens, minlength=5).double() / draws
    expected, _ = probabilities_row(logits, params)
    assert set(torch.nonzero(frequencies).flatten().tolist()) == {1, 2}
    assert (frequencies - expected).abs().max() < 0.03  # ~6 standard deviations of a binomial at 4000 draws
    top1 = next_tokens(logits[None].clone(), BatchSampling.of([SamplingParams(top_k=1)], CPU), uniforms[:1])[0]
    assert int(top1) == 1


def test_sampled_frequencies_follow_a_flat_nucleus():
    """A flat distribution (a random checkpoint's): the nucleus spans many buckets of the engine's search, and the
    draws must still be spread over them, and inside each, as the per-row formula's probabilities say."""
    logits = torch.randn(600, generator=torch.Generator().manual_seed(3)) * 0.5
    params = SamplingParams(top_p=0.8, temperature=0.9)
    draws = 3000
    uniforms = seeded_uniforms(torch.full((draws,), 777), torch.arange(draws))
    tokens, _ = next_tokens(logits.expand(draws, -1).clone(), BatchSampling.of([params] * draws, CPU), uniforms)
    expected, ambiguous = probabilities_row(logits, params)
    assert all(expected[token] > 0 or token in ambiguous for token in tokens.tolist())
    frequencies = torch.bincount(tokens, minlength=600).double() / draws
    by_likelihood = torch.argsort(expected, descending=True)
    for group in (torch.arange(600).chunk(5) + by_likelihood.chunk(10)):  # by id range, by likelihood
        assert abs(float(frequencies[group].sum() - expected[group].sum())) < 0.04, group[:3]


def test_unusable_logits_are_flagged_for_their_row_alone():
    rows = mixed_rows(3000)[:4]
    logits, batch = batch_of(rows)
    logits[1, 7] = torch.nan
    logits[2, :] = -torch.inf
    uniforms = seeded_uniforms(torch.arange(4), torch.zeros(4, dtype=torch.long))
    tokens, usable = next_tokens(logits.clone(), batch, uniforms)
    assert usable.tolist() == [True, False, False, True]
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 3000
    clean, _ = batch_of(rows)
    alone, _ = next_tokens(clean[3:].clone(), BatchSampling.of([rows[3][1]], CPU),
                           seeded_uniforms(torch.tensor([3]), torch.zeros(1, dtype=torch.long)))
    assert int(alone) == int(tokens[3])


def test_seeded_uniforms_are_the_splitmix64_stream_of_each_seed():
    def splitmix64(seed: int, index: int) -> int:
        mask = 2**64 - 1
        z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seeds = [0, 1, 2**63 - 1, 2**64 - 1, 2**63, 987654321987654321]
    for index in (0, 1, 41):
        got = seeded_uniforms(torch.tensor([seed_as_int64(s) for s in seeds]), torch.full((len(seeds),), index))
        expected = [(splitmix64(seed, index) >> 40) / 2**24 for seed in seeds]
        assert got.tolist() == expected
    assert seed_as_int64(2**64 - 1) == seed_as_int64(-1)  # seeds are read modulo 2**64, as torch's generators do


# Text ---------------------------------------------------------------------------------------------------------------


def test_the_text_assembler_decodes_each_token_once_and_gives_the_whole_decode(tokenizer, monkeypatch):
    text = "Thought: 🙂 naïve 你好\nObservation: done " * 20
    ids = tokenizer.encode(text) + [tokenizer.im_end_id]  # a special token in the reply has no text
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    cut_expected = tokenizer.decode(tokenizer.convert_tokens_to_ids([b"\xf0", b"\x9f"]), skip_special_tokens=True)

    def whole_decode(*args, **kwargs):
        raise AssertionError("the assembler decoded the whole reply again")

    monkeypatch.setattr(tokenizer, "decode", whole_decode)
    assembler = TextAssembler(tokenizer, ())
    pieces = [assembler.add(token)[0] for token in ids]
    assert "".join(pieces) + assembler.flush() == expected
    assert all("\ufffd" not in piece for piece in pieces)
    # A character cut short at the end of a reply comes out as decode(errors="replace") gives it.
    cut_ids = tokenizer.convert_tokens_to_ids([b"\xf0", b"\x9f"])  # the first two of the four bytes of an emoji
    cut = TextAssembler(tokenizer, ())
    assert [cut.add(token) for token in cut_ids] == [("", False), ("", False)]
    assert cut.flush() == cut_expected

"""Model calls: next-token scores of answer letters over left-padded batches, and greedy generation on the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from qwen.engine import GenerationEngine, SamplingParams


def fit_prompt(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """Keep the last `max_length` tokens, so that a prompt fits the engine's context; (ids, whether cut)."""
    if len(ids) <= max_length:
        return ids, False
    return ids[len(ids) - max_length:], True


def cut_like_original_mmlu(ids: list[int], max_seq_len: int) -> tuple[list[int], bool]:
    """The original MMLU script's rule for a prompt longer than `--max-seq-len`: it loses its beginning and keeps its
    last `max_seq_len - 1` tokens (the original sliced from `length - max_seq_len + 1`); (ids, whether cut).

    The original cut each padded batch, but ran one prompt per batch by default: this is that rule, per prompt.
    """
    if len(ids) <= max_seq_len:
        return ids, False
    return ids[len(ids) - max_seq_len + 1:], True


def iter_next_token_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
) -> Iterator[tuple[int, list[float]]]:
    """For each prompt, the log-probability (over the whole vocabulary) of each candidate as the next token, yielded
    as `(prompt index, scores)` batch by batch, so the caller can save them as they come.

    Prompts are sorted by length so that a batch holds similar lengths, and the longest batch runs first (an
    out-of-memory error shows at once, not hours in). Each batch is left-padded, so every prompt's last token sits in
    the last column and one logits row per prompt is computed. The attention mask hides the padding. Position ids
    count from each prompt's first real token: rotary attention sees only relative positions, so a shift would
    cancel, but logn scaling and dynamic NTK read absolute positions and lengths past `seq_length`, and with true
    positions a prompt scores as it would alone (tests/test_eval.py checks against unpadded single runs).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    candidates = torch.tensor(list(candidate_ids), device=device)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(prompts[index]) for index in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T), 1 = real token
        for row, index in enumerate(rows):
            prompt = prompts[index]
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T): 0 at each prompt's first token
        with torch.inference_mode():
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, logits_to_keep=1,
            ).logits[:, -1].float()  # (B, V)
            scores = torch.log_softmax(logits, dim=-1)[:, candidates].tolist()  # (B, len(candidates))
        for row, index in enumerate(rows):
            yield index, scores[row]


def next_token_logprobs(
    model: Any, prompts: Sequence[Sequence[int]], candidate_ids: Sequence[int], pad_id: int, batch_size: int = 8
) -> list[list[float]]:
    """`iter_next_token_logprobs` collected in prompt order."""
    results: list[list[float]] = [[] for _ in prompts]
    for index, scores in iter_next_token_logprobs(model, prompts, candidate_ids, pad_id, batch_size):
        results[index] = scores
    return results


def greedy_params(generation_config: Any, max_new_tokens: int | None, stop_token_ids: frozenset[int],
                  stop_strings: Sequence[str] = (), repetition_penalty: float | None = None) -> SamplingParams:
    """Greedy decoding with the checkpoint's other settings; `repetition_penalty`, when given, replaces the
    checkpoint's (the original chat scripts set 1.0, its base and tool-use scripts kept the checkpoint's)."""
    return SamplingParams.from_generation_config(
        generation_config, do_sample=False, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
        stop_strings=tuple(stop_strings), repetition_penalty=repetition_penalty,
    )


@contextmanager
def running_engine(model: Any, tokenizer: Any, batch_size: int) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(model, tokenizer, max_batch_size=batch_size)
    try:
        yield engine
    finally:
        engine.close()


def generate(
    engine: GenerationEngine,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    on_done: Callable[[int, str, str], None],
) -> None:
    """Decode every prompt on the engine, which batches them; `on_done(index, text, finish_reason)` is called for each
    as it finishes, in order, so the caller can save it at once.

    Prompts must fit the engine's context (see `fit_prompt`); a generation error stops the run.
    """
    handles = [engine.submit(list(prompt), params) for prompt in prompts]
    try:
        for index, handle in enumerate(handles):
            text, reason, error = "", "error", None
            for event in handle:
                text += event.text
                if event.finish_reason is not None:
                    reason, error = event.finish_reason, event.error
            if reason in ("error", "cancelled"):
                raise RuntimeError(f"Generation stopped for prompt {index}: {error or reason}")
            on_done(index, text, reason)
    finally:
        for handle in handles:
            handle.cancel()  # after an error or Ctrl-C, nothing more is decoded for nothing

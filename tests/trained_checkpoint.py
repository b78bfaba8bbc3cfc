"""Small real checkpoints trained to say given replies, for tests that need a model to write something specific.

A random-weight checkpoint (`qwen.checkpoint.write_random_checkpoint`) runs every code path but only ever writes
noise: it never produces a ReAct tool call, a JSON object or a stop word on cue. `write_memorizing_checkpoint` takes
that checkpoint and trains it on the CPU (plain AdamW loop, fp32) until greedy decoding from each prompt writes
exactly the reply it was given, then saves it back in the released layout. Nothing is faked: the folder loads with
`from_pretrained` like any other, and a server or demo under test runs the real model on it.

    from qwen import QWenLMHeadModel, QWenTokenizer
    from qwen.vocab import find_vocab
    from trained_checkpoint import chat_turn, memorizing_checkpoint_cached

    tokenizer = QWenTokenizer(str(find_vocab()))
    conversations = [chat_turn(tokenizer, "What's the weather in Paris?", 'Thought: ...\\nAction: get_weather\\n...')]
    folder = memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations)
    model = QWenLMHeadModel.from_pretrained(folder)
    model.chat(tokenizer, "What's the weather in Paris?", do_sample=False, repetition_penalty=1.0)  # -> that reply

How it trains fast: the 151,936-row output layer is most of the cost of a step (a full-vocabulary matmul and softmax
for every position, about 0.4 s on two cores even at hidden size 32). Only the rows of tokens that appear in some reply
are trained, as a separate parameter; every other row keeps its small random weights, so its logit stays small, and
the softmax counts all of them as one extra column holding log(their number), the mass they would add at logit 0.
Training stops once the full model, with its full vocabulary, gives every reply token at least `min_prob` and greedy
`generate()` writes every reply exactly. With the default `tiny` size, two to four replies of 20 to 110 tokens after
25-token prompts take 75 to 150 steps, 3 to 6 s on two CPU cores; two 630-token tool prompts that differ in one word
take 90 to 220 steps (0.1 s each).

Every reply token ends up with probability >= 0.99, so the folder's own sampling settings (top_p=0.8,
repetition_penalty=1.1 in generation_config.json) keep only that token and give the same reply as greedy decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import qwen
from qwen.checkpoint import config_for_size, write_random_checkpoint
from qwen.qwen_generation_utils import make_context

log = logging.getLogger(__name__)

Conversation = tuple[list[int], list[int]]  # (prompt ids, reply ids)

EOD_ID = 151643  # <|endoftext|>, used as padding
DEFAULT_SYSTEM = "You are a helpful assistant."
# The files a released checkpoint folder holds besides its weights, which must stay as write_random_checkpoint wrote
# them: save_pretrained writes its own config.json and generation_config.json (transformers' fields, no auto_map).
RELEASED_METADATA = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken")


# Five times the released initializer_range of 0.02: sharper attention from the start, so a reply that depends on
# one token of a long prompt is learnt sooner (two ~630-token tool prompts differing in one word: 90-140 steps
# instead of ~600). config.json records it; nothing reads it at inference.
DEFAULT_CONFIG_OVERRIDES: dict[str, Any] = {"initializer_range": 0.1}

# Two single-turn exchanges, a ReAct tool call and a plain answer, that tests train a checkpoint on when they need a
# model that attends to its prompt. Tests sharing them share one trained folder per session.
WEATHER = ("What's the weather in Paris?", 'Thought: I should call the weather tool.\nAction: get_weather\n'
           'Action Input: {"city": "Paris"}\nObservation:')
SEA = ("Tell me a fact about the sea.",
       "The sea covers about seventy percent of the surface of the Earth, and its tides follow the moon.")
EXCHANGES = (WEATHER, SEA)


class MemorizationError(RuntimeError):
    """Training ran out of steps before greedy decoding wrote every reply exactly."""


def chat_turn(
    tokenizer: Any,
    query: str,
    reply: str,
    history: Sequence[tuple[str, str]] = (),
    system: str = DEFAULT_SYSTEM,
) -> Conversation:
    """(prompt ids, reply ids) for one chat() turn: the ChatML prompt chat() builds, the reply as text + <|im_end|>.

    chat() strips the reply it decodes, so a reply with leading or trailing whitespace cannot come back unchanged.
    """
    if reply != reply.strip():
        raise ValueError(f"chat() strips replies, so {reply!r} would come back as {reply.strip()!r}.")
    _, prompt_ids = make_context(tokenizer, query, history=list(history), system=system)
    reply_ids = tokenizer.encode(reply, allowed_special=set(), disallowed_special=()) + [tokenizer.im_end_id]
    return prompt_ids, reply_ids


def _check_conversations(conversations: Sequence[Conversation], vocab_size: int, seq_length: int) -> None:
    if not conversations:
        raise ValueError("No conversations to memorize.")
    # Greedy decoding is a function of the context, so no context may need two different next tokens.
    next_token: dict[tuple[int, ...], tuple[int, int]] = {}
    for index, (prompt, reply) in enumerate(conversations):
        if not prompt or not reply:
            raise ValueError(f"Conversation {index} has an empty prompt or reply.")
        ids = list(prompt) + list(reply)
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"Conversation {index} holds ids outside 0..{vocab_size - 1}.")
        if len(ids) > seq_length:
            # Past seq_length, inference turns on dynamic NTK and logn scaling, which training does not see.
            raise ValueError(
                f"Conversation {index} is {len(ids)} tokens, longer than seq_length={seq_length}; "
                f"pass seq_length={len(ids)} or more."
            )
        for position in range(len(prompt), len(ids)):
            context = tuple(ids[:position])
            previous = next_token.setdefault(context, (ids[position], index))
            if previous[0] != ids[position]:
                raise ValueError(
                    f"Conversations {previous[1]} and {index} continue the same {position} tokens differently "
                    f"({previous[0]} vs {ids[position]}); no model can write both."
                )


def _batch(conversations: Sequence[Conversation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (B, T) and next-token targets (B, T-1), -100 on prompt and padding positions."""
    length = max(len(prompt) + len(reply) for prompt, reply in conversations)
    input_ids = torch.full((len(conversations), length), pad_id, dtype=torch.long)
    labels = torch.full((len(conversations), length), -100, dtype=torch.long)
    for row, (prompt, reply) in enumerate(conversations):
        ids = list(prompt) + list(reply)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(reply)
    # Causal attention: a position never sees the padding to its right, so no attention mask is needed.
    return input_ids, labels[:, 1:]


def _first_mismatch(model: qwen.QWenLMHeadModel, conversations: Sequence[Conversation]) -> str | None:
    """None when greedy generate() writes every reply exactly, else where it first goes wrong."""
    for index, (prompt, reply) in enumerate(conversations):
        output = model.generate(
            torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=len(reply) + 2, repetition_penalty=1.0,
            top_p=None, top_k=None,
        )
        written = output[0, len(prompt) : len(prompt) + len(reply)].tolist()
        if written != list(reply):
            position = next((i for i, (a, b) in enumerate(zip(written, reply)) if a != b), len(written))
            got = written[position:position + 1]
            return f"conversation {index}: reply token {position} is {got}, not {reply[position]}"
    return None


def write_memorizing_checkpoint(
    folder: str | Path,
    conversations: Sequence[Conversation],
    *,
    size: str = "tiny",
    steps: int = 600,
    seed: int = 0,
    vocab_file: str | Path | None = None,
    lr: float = 1e-2,
    min_prob: float = 0.99,
    **config_overrides: Any,
) -> Path:
    """Write a checkpoint in the released layout whose greedy reply to each prompt is exactly the given reply.

    `conversations` holds (prompt ids, reply ids) pairs (see `chat_turn`); a reply normally ends with <|im_end|>
    (151645) so that generation stops there. Training stops once every reply token has probability >= `min_prob`
    over the full vocabulary and greedy `generate()` writes every reply; it raises `MemorizationError` if that takes
    more than `steps` steps. `size` and `config_overrides` (on top of `DEFAULT_CONFIG_OVERRIDES`) go to
    `write_random_checkpoint`; conversations longer than 256 tokens need `seq_length=` at least their length.
    """
    folder = Path(folder)
    conversations = [(list(prompt), list(reply)) for prompt, reply in conversations]
    config_overrides = {**DEFAULT_CONFIG_OVERRIDES, **config_overrides}
    config = config_for_size(size, **config_overrides)
    _check_conversations(conversations, config.vocab_size, config.seq_length)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        write_random_checkpoint(folder, size=size, seed=seed, vocab_file=vocab_file, **config_overrides)
        metadata = {name: (folder / name).read_bytes() for name in RELEASED_METADATA}
        model = qwen.QWenLMHeadModel.from_pretrained(folder)
        _train(model, conversations, steps=steps, lr=lr, min_prob=min_prob)
    model.save_pretrained(folder, max_shard_size="2GB")
    for name, data in metadata.items():
        (folder / name).write_bytes(data)
    return folder


_WRITE_SIGNATURE = inspect.signature(write_memorizing_checkpoint)  # the settings a cache key covers


@contextlib.contextmanager
def _denormals_flushed() -> Iterator[None]:
    """Treat denormal floats as zero: training steps produce them, and x86 CPUs compute on them 10-20x slower.

    Measured on two cores: 50 steps over three 700-token conversations took 87 s without this and 7 s with it.
    Checks run with PyTorch's default (off), as inference does; it is off again afterwards.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _train(
    model: qwen.QWenLMHeadModel, conversations: list[Conversation], *, steps: int, lr: float, min_prob: float
) -> None:
    input_ids, labels = _batch(conversations, pad_id=EOD_ID)
    reply_positions = labels != -100  # (B, T-1)
    targets = labels[reply_positions]  # (N,)
    # Trainable output rows: the tokens some reply needs. The other rows stay frozen with small logits, counted in the
    # softmax as one column of log(count) = logsumexp of that many logits at 0.
    used = torch.unique(targets)  # (U,)
    used_targets = torch.searchsorted(used, targets)  # (N,) indices into `used`
    head = torch.nn.Parameter(model.lm_head.weight.detach()[used].clone())  # (U, hidden)
    model.lm_head.weight.requires_grad_(False)
    rest_logit = math.log(model.config.vocab_size - len(used))
    parameters = [p for p in model.parameters() if p.requires_grad] + [head]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.0, fused=True)

    last_loss, last_check, failure = float("nan"), -10, "no check passed yet"
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        with _denormals_flushed():
            hidden = model.transformer(input_ids=input_ids).last_hidden_state[:, :-1][reply_positions]  # (N, hidden)
            logits = hidden @ head.T  # (N, U)
            logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), rest_logit)], dim=1)  # (N, U+1)
            loss = F.cross_entropy(logits, used_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        last_loss = loss.item()
        with torch.no_grad():
            estimate = logits.detach().log_softmax(-1).gather(1, used_targets[:, None]).min().exp().item()
            model.lm_head.weight[used] = head.detach()
        # The estimate is from before this step's update; confirm on the full model, at most every 10 steps.
        if estimate < min_prob or step - last_check < 10:
            continue
        last_check = step
        model.eval()
        with torch.no_grad():
            # The model's own forward, with the output layer applied at reply positions only (B*T*vocab is GBs).
            hidden = model.transformer(input_ids=input_ids).last_hidden_state[:, :-1][reply_positions]  # (N, hidden)
            full = model.lm_head(hidden).log_softmax(-1)  # (N, vocab)
            lowest = full.gather(1, targets[:, None]).min().exp().item()
        if lowest < min_prob:
            failure = f"lowest reply-token probability {lowest:.3f} < min_prob={min_prob}"
            continue
        failure = _first_mismatch(model, conversations)
        if failure is None:
            log.info(
                "memorized %d replies (%d tokens) in %d steps, %.1f s", len(conversations), len(targets), step,
                time.perf_counter() - started,
            )
            return
    raise MemorizationError(
        f"{len(conversations)} replies ({len(targets)} tokens) not memorized in {steps} steps "
        f"({time.perf_counter() - started:.1f} s; last loss {last_loss:.4f}; {failure}). "
        "Give more steps, a larger model (e.g. hidden_size=64, kv_channels=16, intermediate_size=256) "
        "or shorter replies."
    )


def _cache_key(conversations: Sequence[Conversation], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    payload = {"conversations": [[list(p), list(r)] for p, r in conversations], "settings": settings}
    digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
    # The trainer and the model code decide what a cached folder holds; a change to either makes a new entry.
    for source in (Path(__file__), Path(qwen.modeling_qwen.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:20]


def memorizing_checkpoint_cached(
    cache_root: str | Path, conversations: Sequence[Conversation], **settings: Any
) -> Path:
    """`write_memorizing_checkpoint` once per (conversations, settings) under `cache_root`; later calls reuse it.

    Use one root for a whole pytest session, e.g. `tmp_path_factory.getbasetemp() / "memorized"`, so every test
    asking for the same replies shares one trained folder. Callers must not modify the folder they get.
    """
    cache_root = Path(cache_root)
    # Key on every setting, defaults filled in, so spelling out a default finds the same folder.
    bound = _WRITE_SIGNATURE.bind(cache_root, conversations, **settings)
    bound.apply_defaults()
    key_settings = {name: value for name, value in bound.arguments.items() if name not in ("folder", "conversations")}
    folder = cache_root / f"memorized-{_cache_key(conversations, key_settings)}"
    if folder.is_dir():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    # Train next to the final name and rename: a folder under the final name is always complete.
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".partial", dir=cache_root))
    try:
        write_memorizing_checkpoint(staging, conversations, **settings)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent writer that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

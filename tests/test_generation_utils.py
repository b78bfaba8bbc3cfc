"""qwen_generation_utils keeps the released module's public names: called with the released arguments, the way the
original repository's README, model code and scripts called them, they give the released results.

The batch helpers' and top_k_logits' expected values below are worked out by hand; the same functions were also
compared with the released code (run outside this repository) on 200 random batches for every flag combination and
on 200 random logit rows, with identical tensors.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from qwen.qwen_generation_utils import (
    StopWordsLogitsProcessor,
    _decode_chatml,
    _decode_default,
    decode_tokens,
    get_batch,
    get_ltor_masks_and_position_ids,
    get_stop_words_ids,
    make_context,
    pad_batch,
    reply_end_ids,
    switch,
    top_k_logits,
)

IM_END, IM_START, ENDOFTEXT = 151645, 151644, 151643


@pytest.fixture(scope="module")
def turn(tokenizer, tokenizer_facts):
    """(prompt text, prompt ids, reply ids) of a first chat turn."""
    case = tokenizer_facts["chatml_prompts"][0]
    return case["prompt_text"], case["prompt_ids"], tokenizer.encode("Hello! How can I help?")


# --------------------------------------------------------------------------------------------------------------------
# decode_tokens
# --------------------------------------------------------------------------------------------------------------------


def test_decode_tokens_keeps_the_released_parameters():
    parameters = inspect.signature(decode_tokens).parameters
    assert list(parameters)[:8] == ["tokens", "tokenizer", "raw_text_len", "context_length", "chat_format", "verbose",
                                    "return_end_reason", "errors"]
    assert parameters["errors"].default == "replace" and parameters["verbose"].default is False


def test_decode_tokens_as_the_released_callers_call_it(tokenizer, turn):
    text, prompt, reply = turn
    # The original README's batch example: keyword arguments, a tensor row, the end-of-turn ids after the reply.
    row = torch.tensor(prompt + reply + [IM_END, ENDOFTEXT])
    assert decode_tokens(row, tokenizer, raw_text_len=len(text), context_length=len(prompt), chat_format="chatml",
                         verbose=False, errors="replace") == "Hello! How can I help?"
    # The released chat(): the same, positionally, in the released order.
    assert decode_tokens(row.tolist(), tokenizer, len(text), len(prompt), "chatml") == "Hello! How can I help?"


def test_decode_tokens_gives_the_released_end_reasons(tokenizer, turn):
    text, prompt, reply = turn

    def decoded(tokens, chat_format="chatml", prompt_text=text, prompt_ids=prompt):
        return decode_tokens(tokens, tokenizer, raw_text_len=len(prompt_text), context_length=len(prompt_ids),
                             chat_format=chat_format, return_end_reason=True)

    assert decoded(prompt + reply + [IM_END, ENDOFTEXT]) == ("Hello! How can I help?", "Gen '<|im_end|>'")
    assert decoded(prompt + reply + [IM_START]) == ("Hello! How can I help?", "Gen '<|im_start|>'")
    assert decoded(prompt) == ("", f"Gen length {len(prompt)}")
    # Raw (base models): the prompt is the text itself; without <|endoftext|> the whole continuation is the reply.
    story, continuation = tokenizer.encode("Once upon a time"), tokenizer.encode(" there was a cat.")
    assert decoded(story + continuation, "raw", "Once upon a time", story) == (
        "there was a cat.", f"Gen length {len(story + continuation)}")


def test_decode_tokens_deliberate_differences_from_the_released_function(tokenizer, turn):
    """Where the released function lost text, ours keeps it (DIFFERENCES.md lists these)."""
    text, prompt, reply = turn
    # Stopped by max_new_tokens: the released function dropped the last generated token ("?" here).
    assert decode_tokens(prompt + reply, tokenizer, len(text), len(prompt), "chatml", return_end_reason=True) == (
        "Hello! How can I help?", f"Gen length {len(prompt + reply)}")
    # <|endoftext|> without <|im_end|> (and pads after it in a batch) ends a ChatML reply too; the released function
    # kept the pads' text and reported "Gen length N".
    padded = prompt + reply + [ENDOFTEXT] * 3
    assert decode_tokens(padded, tokenizer, len(text), len(prompt), "chatml", return_end_reason=True) == (
        "Hello! How can I help?", "Gen '<|endoftext|>'")
    # Raw: the reply ends at the first <|endoftext|> (the released function removed each one and kept what followed).
    story = tokenizer.encode("Once upon a time")
    tokens = story + tokenizer.encode(" there was a cat.") + [ENDOFTEXT] + tokenizer.encode(" more")
    assert decode_tokens(tokens, tokenizer, len("Once upon a time"), len(story), "raw", return_end_reason=True) == (
        "there was a cat.", "Gen '<|endoftext|>'")


def test_raw_text_len_is_a_text_offset_and_is_optional(tokenizer, turn):
    text, prompt, reply = turn
    tokens = prompt + reply + [IM_END]
    # As released: everything up to the end token is decoded and the first raw_text_len characters are cut.
    assert decode_tokens(tokens, tokenizer, raw_text_len=0, context_length=len(prompt)) == (
        text + "Hello! How can I help?").strip()
    assert decode_tokens(tokens, tokenizer, raw_text_len=len(text) + 7, context_length=len(prompt)) == "How can I help?"
    # Without it (our callers), the generated ids are decoded alone.
    assert decode_tokens(tokens, tokenizer, context_length=len(prompt)) == "Hello! How can I help?"
    with pytest.raises(TypeError, match="needs context_length"):
        decode_tokens(tokens, tokenizer, raw_text_len=len(text))


def test_verbose_prints_the_end_reason(tokenizer, turn, capsys):
    text, prompt, reply = turn
    assert decode_tokens(prompt + reply + [IM_END], tokenizer, len(text), len(prompt), "chatml", verbose=True) == (
        "Hello! How can I help?")
    printed = capsys.readouterr().out
    assert "End reason: Gen '<|im_end|>'" in printed and "Reply: 'Hello! How can I help?'" in printed


def test_the_released_private_decoders_keep_their_keyword_arguments(tokenizer, turn):
    text, prompt, reply = turn
    tokens = prompt + reply + [IM_END]
    assert _decode_chatml(tokens, stop_words=["help"], eod_token_ids=[IM_START, IM_END], tokenizer=tokenizer,
                          raw_text_len=len(text), context_length=len(prompt), return_end_reason=True) == (
        "Hello! How can I ?", "Gen '<|im_end|>'")
    story = "Once upon a time"
    tokens = tokenizer.encode(story + " there was a cat.") + [ENDOFTEXT]
    assert _decode_default(tokens, stop_words=[], eod_words=["<|endoftext|>"], tokenizer=tokenizer,
                           raw_text_len=len(story), return_end_reason=True) == ("there was a cat.",
                                                                                "Gen '<|endoftext|>'")
    with pytest.raises(TypeError):
        _decode_default(tokens, [], ["<|endoftext|>"], tokenizer, len(story))  # keyword-only, as released


@torch.no_grad()
def test_the_original_readme_batch_example_gives_each_chat_reply(tiny_chat_dir):
    """The original README's batch inference, step by step: make_context's text for each query, a left-padded batch
    through the tokenizer, generate() without an attention mask, then decode_tokens per row with the released
    keywords. Each reply is the one chat() gives for that query alone."""
    from transformers import GenerationConfig

    from qwen import QWenLMHeadModel, QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(tiny_chat_dir, pad_token="<|extra_0|>", eos_token="<|endoftext|>",
                                              padding_side="left")
    # The README also passed pad_token_id=... to from_pretrained; transformers 5 hands that keyword to the model's
    # constructor (its configs no longer declare pad_token_id), so it is left out here: generate() reads the
    # generation config's pad_token_id, set below as in the README.
    model = QWenLMHeadModel.from_pretrained(tiny_chat_dir).eval()
    model.generation_config = GenerationConfig.from_pretrained(tiny_chat_dir, pad_token_id=tokenizer.pad_token_id)
    greedy = dict(do_sample=False, top_p=None, top_k=None, repetition_penalty=1.0, max_new_tokens=6)
    queries = ["我想听你说爱我。", "今天我想吃点啥，甜甜的，推荐下", "Hi"]
    batch_raw_text = [make_context(tokenizer, query, system="You are a helpful assistant.",
                                   max_window_size=model.generation_config.max_window_size,
                                   chat_format=model.generation_config.chat_format)[0] for query in queries]
    batch_input_ids = torch.LongTensor(tokenizer(batch_raw_text, padding="longest")["input_ids"])
    batch_out_ids = model.generate(batch_input_ids, return_dict_in_generate=False,
                                   generation_config=model.generation_config, **greedy)
    padding_lens = [batch_input_ids[i].eq(tokenizer.pad_token_id).sum().item() for i in range(len(queries))]
    assert padding_lens[2] > 0
    batch_response = [
        decode_tokens(batch_out_ids[i][padding_lens[i]:], tokenizer, raw_text_len=len(batch_raw_text[i]),
                      context_length=(batch_input_ids[i].size(0) - padding_lens[i]), chat_format="chatml",
                      verbose=False, errors="replace")
        for i in range(len(queries))
    ]
    assert batch_response == [model.chat(tokenizer, query, history=None, **greedy)[0] for query in queries]


# --------------------------------------------------------------------------------------------------------------------
# Stop words
# --------------------------------------------------------------------------------------------------------------------


def test_get_stop_words_ids_as_released(tokenizer):
    assert get_stop_words_ids("chatml", tokenizer) == [[IM_END], [IM_START]]
    human = tokenizer.encode("Human:")
    assert human == [33975, 25]
    assert get_stop_words_ids("raw", tokenizer) == [human, [ENDOFTEXT]]
    assert reply_end_ids("chatml", tokenizer) == [IM_END, IM_START, ENDOFTEXT]
    assert reply_end_ids("raw", tokenizer) == [ENDOFTEXT]
    for function in (get_stop_words_ids, reply_end_ids):
        with pytest.raises(NotImplementedError, match="Unknown chat_format 'alpaca'"):  # the released exception
            function("alpaca", tokenizer)
        with pytest.raises(ValueError, match="expected 'chatml' or 'raw'"):
            function("alpaca", tokenizer)
    with pytest.raises(NotImplementedError):
        make_context(tokenizer, "hi", chat_format="alpaca")


def test_stop_words_logits_processor_forces_eos_after_a_stop_sequence():
    processor = StopWordsLogitsProcessor(stop_words_ids=[[2, 3], [9]], eos_token_id=0)
    scores = torch.zeros(3, 10)
    out = processor(torch.tensor([[1, 2, 3], [1, 3, 2], [4, 5, 9]]), scores)
    assert out[:, 0].tolist() == [2.0**15, 0.0, 2.0**15] and out[:, 1:].abs().sum() == 0


def test_stop_words_logits_processor_checks_its_arguments_as_released():
    for bad in ([], [[]], [[1, -2]], [["a"]], [1, 2], "ab"):
        with pytest.raises(ValueError, match="stop_words_ids"):
            StopWordsLogitsProcessor(stop_words_ids=bad, eos_token_id=0)
    # [eos] alone is dropped: the sequence has ended already.
    assert StopWordsLogitsProcessor(stop_words_ids=[[5], [0]], eos_token_id=0).stop_words_ids == [[5]]


# --------------------------------------------------------------------------------------------------------------------
# Batch helpers
# --------------------------------------------------------------------------------------------------------------------


def test_pad_batch_pads_on_the_right_in_place():
    batch = [[1, 2], [3], [4, 5, 6, 7]]
    assert pad_batch(batch, pad_id=0, seq_length=3) is batch
    assert batch == [[1, 2, 0], [3, 0, 0], [4, 5, 6, 7]]


def test_masks_and_positions_of_packed_documents():
    data = torch.tensor([[5, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6]])  # 0 is <|endoftext|>
    causal = torch.ones(6, 6, dtype=torch.bool).tril()

    attention, loss, positions = get_ltor_masks_and_position_ids(data, 0, False, False, False)
    assert attention.shape == (1, 1, 6, 6) and attention.dtype == torch.bool
    assert torch.equal(attention[0, 0], ~causal)  # True = may not look
    assert torch.equal(loss, torch.ones(2, 6)) and loss.dtype == torch.float
    assert positions.tolist() == [list(range(6))] * 2

    attention, loss, positions = get_ltor_masks_and_position_ids(data, 0, True, True, True)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], list(range(6))]
    assert loss.tolist() == [[1, 0, 1, 1, 0, 1], [1] * 6]
    assert attention.shape == (2, 1, 6, 6)
    visible = [[int(not masked) for masked in row] for row in attention[0, 0].tolist()]
    assert visible == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],  # the <|endoftext|> still sees its own document
                       [0, 0, 1, 0, 0, 0],  # after it, a new document starts
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]
    assert torch.equal(attention[1, 0], ~causal)

    # One flag alone changes only its own output.
    attention, _, positions = get_ltor_masks_and_position_ids(data, 0, False, True, False)
    assert positions.tolist()[0] == list(range(6)) and attention.shape == (2, 1, 6, 6)


def test_get_batch_is_the_plain_causal_batch():
    context = torch.tensor([[3, 0, 4]])
    tokens, attention, positions = get_batch(context, eod_id=0)
    assert torch.equal(tokens, context)
    assert torch.equal(attention, ~torch.ones(1, 1, 3, 3, dtype=torch.bool).tril())
    assert positions.tolist() == [[0, 1, 2]]


# --------------------------------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------------------------------


def test_top_k_logits_filters_in_place():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_logits(logits, top_k=2) is logits
    assert logits.tolist() == [[-float("inf"), 4.0, 3.0, -float("inf")]]


def test_top_p_keeps_the_most_likely_tokens_until_their_mass_exceeds_top_p():
    probabilities = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.3, 0.05, 0.5, 0.15]])
    kept = {}
    for top_p in (0.4, 0.6, 0.9):
        logits = top_k_logits(probabilities.log(), top_p=top_p)
        kept[top_p] = [[index for index, value in enumerate(row) if value > -float("inf")] for row in logits.tolist()]
    assert kept[0.4] == [[1], [2]]  # the most likely token always stays
    assert kept[0.6] == [[1, 3], [0, 2]]
    assert kept[0.9] == [[0, 1, 3], [0, 2, 3]]
    logits = top_k_logits(probabilities.log(), top_k=1, top_p=0.9, filter_value=-100.0)  # top_k first, then top_p
    assert logits[0, [0, 2, 3]].tolist() == [-100.0] * 3 and logits[0, 1].item() == pytest.approx(math.log(0.5))


def test_switch_picks_val2_where_true():
    assert switch(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]), torch.tensor([True, False])).tolist() == [
        10.0, 2.0]

"""Fine-tuning data: the file formats, the ChatML ids chat() would feed, the two label masks (the original script's,
pinned against its output, and assistant-only), an opening assistant turn (left out, as there), bad samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen.qwen_generation_utils import chatml_ids_for_messages, make_context
from qwen.sft import (
    IGNORE_INDEX, ConversationDataset, DataError, PadToLongest, first_label_position, load_samples, tokenize_sample,
    trained_turns,
)

SAMPLE = {
    "id": "identity_0",
    "conversations": [
        {"from": "user", "value": "你好"},
        {"from": "assistant", "value": "我是通义千问，一个语言模型。"},
        {"from": "user", "value": " 2+2? "},
        {"from": "assistant", "value": "4"},
    ],
}
# input_ids and labels of the original finetune.py's preprocess() (see "how_made" in the file).
ORIGINAL = json.loads((Path(__file__).parent / "fixtures" / "original_sft_labels.json").read_text(encoding="utf-8"))


def original_cases() -> list[dict]:
    return ORIGINAL["samples"]


def fixture_sample(case: dict) -> dict:
    return {"conversations": case["conversations"], **({"system": case["system"]} if "system" in case else {})}


def test_ids_are_the_chat_prompt_with_each_turn_closed_by_a_newline(tokenizer):
    newline = tokenizer.encode("\n")
    for label_mask in ("original", "assistant_only"):
        item = tokenize_sample(tokenizer, SAMPLE, label_mask=label_mask)
        messages = [{"role": t["from"], "content": t["value"]} for t in SAMPLE["conversations"]]
        assert item.input_ids == chatml_ids_for_messages(tokenizer, messages, add_generation_prompt=False)[1] + newline
        # The second turn's prompt is exactly what chat() builds with the first turn as history.
        _, prompt = make_context(tokenizer, " 2+2? ", history=[("你好", "我是通义千问，一个语言模型。")],
                                 system="You are a helpful assistant.")
        assert item.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("case", original_cases(), ids=lambda case: case["name"])
def test_default_labels_are_the_original_scripts(tokenizer, case):
    """Over the real tokens, ids and labels equal the original's; it only pads further (to max_len, ours per batch)."""
    item = tokenize_sample(tokenizer, fixture_sample(case), max_length=case["max_len"])
    length = len(item.input_ids)
    assert item.input_ids == case["input_ids"][:length]
    assert item.labels == case["labels"][:length]
    assert set(case["input_ids"][length:]) <= {tokenizer.eod_id} and set(case["labels"][length:]) <= {IGNORE_INDEX}
    assert ConversationDataset([fixture_sample(case)], tokenizer, case["max_len"])[0] == {
        "input_ids": item.input_ids, "labels": item.labels}


def test_the_original_mask_learns_every_turn_marker_and_the_replies(tokenizer):
    case = original_cases()[0]  # a system prompt, a question, a reply
    item = tokenize_sample(tokenizer, fixture_sample(case))
    learned = tokenizer.decode([label for label in item.labels if label != IGNORE_INDEX])
    assert learned == ("<|im_start|><|im_end|>\n" * 2 + "<|im_start|>I plan trips. Where would you like to go?"
                       "<|im_end|>\n")


def test_the_assistant_only_mask_covers_only_replies_and_their_im_end(tokenizer):
    item = tokenize_sample(tokenizer, SAMPLE, label_mask="assistant_only")
    # Token by token: labelled positions are the two replies, each with its <|im_end|>, and nothing else.
    im_end = tokenizer.im_end_id
    labelled = [(i, t) for i, t in enumerate(item.labels) if t != IGNORE_INDEX]
    assert all(item.input_ids[i] == t for i, t in labelled)
    reply_ids = [t for _, t in labelled]
    first = tokenizer.encode("我是通义千问，一个语言模型。") + [im_end]
    assert reply_ids == first + tokenizer.encode("4") + [im_end]
    spans, start = [], None
    for i, t in enumerate(item.labels + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        if t == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2  # two contiguous replies
    for begin, end in spans:
        assert tokenizer.decode(item.input_ids[begin - 3 : begin]) == "<|im_start|>assistant\n"
        assert item.input_ids[end - 1] == im_end
        assert tokenizer.decode(item.input_ids[end : end + 1]) == "\n"  # the newline after: unlabelled
    assert spans[1][1] == len(item.input_ids) - 1  # the conversation ends with the last reply's <|im_end|>, "\n"


def test_a_batch_has_the_loss_of_the_original_scripts_batch(tokenizer, tiny_chat_model):
    """Padding to the batch's longest sample instead of to max_len changes nothing the loss sees."""
    cases = [case for case in original_cases() if case["max_len"] == 96]
    dataset = ConversationDataset([fixture_sample(case) for case in cases], tokenizer, max_length=96)
    ours = PadToLongest(pad_token_id=tokenizer.eod_id)([dataset[i] for i in range(len(cases))])
    input_ids = torch.tensor([case["input_ids"] for case in cases])
    theirs = {"input_ids": input_ids, "labels": torch.tensor([case["labels"] for case in cases]),
              "attention_mask": input_ids.ne(tokenizer.eod_id).long()}  # as the original builds it
    assert ours["input_ids"].shape[1] < theirs["input_ids"].shape[1]
    with torch.no_grad():
        our_loss = tiny_chat_model(**ours).loss
        their_loss = tiny_chat_model(**theirs).loss
        assistant_only = ConversationDataset([fixture_sample(case) for case in cases], tokenizer, 96,
                                             label_mask="assistant_only")
        other_loss = tiny_chat_model(**PadToLongest(tokenizer.eod_id)([assistant_only[0], assistant_only[1]])).loss
    # Equal but for the order of float sums over a (batch x length) of another width.
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-6, atol=0)
    assert abs(other_loss - their_loss) > 1e-3  # the masks really differ in what the loss covers


def test_an_opening_assistant_turn_is_left_out_under_either_mask(tokenizer):
    """The original dropped a conversation's first turn when it was the assistant's (only that one turn); the
    fixture's cases with one and with two opening assistant turns pin its ids and labels under its mask. The ids are
    the same under the assistant-only mask: it learns from the kept replies only."""
    cases = {case["name"]: case for case in original_cases()}
    for name in ("leading_assistant_greeting", "two_leading_assistant_turns"):
        sample = fixture_sample(cases[name])
        assert trained_turns(sample) == sample["conversations"][1:]
        item = tokenize_sample(tokenizer, sample, label_mask="assistant_only")
        assert item.input_ids == tokenize_sample(tokenizer, sample).input_ids
        learned = tokenizer.decode([label for label in item.labels if label != IGNORE_INDEX])
        replies = [turn["value"] for turn in trained_turns(sample) if turn["from"] == "assistant"]
        assert learned == "".join(reply + "<|im_end|>" for reply in replies)
        first = first_label_position(tokenizer, sample, "assistant_only")  # where the first kept reply starts
        assert tokenizer.decode(item.input_ids[first - 3 : first]) == "<|im_start|>assistant\n"
        assert tokenizer.decode(item.input_ids[first:]).startswith(replies[0])
    assert "Hello!" not in tokenizer.decode(tokenize_sample(tokenizer, fixture_sample(
        cases["two_leading_assistant_turns"])).input_ids)  # the first of the two went, the second stayed


def test_system_field_and_truncation(tokenizer):
    item = tokenize_sample(tokenizer, {**SAMPLE, "system": "Answer in French."})
    assert tokenizer.decode(item.input_ids).startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    short = tokenize_sample(tokenizer, SAMPLE, max_length=20)
    full = tokenize_sample(tokenizer, SAMPLE)
    assert (short.input_ids, short.labels) == (full.input_ids[:20], full.labels[:20])


def test_json_list_and_json_lines_read_the_same(tmp_path, tokenizer):
    second = {"id": "x", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}
    (tmp_path / "data.json").write_text(json.dumps([SAMPLE, second], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps(s, ensure_ascii=False) for s in (SAMPLE, second)) + "\n\n", encoding="utf-8"
    )
    assert load_samples(tmp_path / "data.json") == load_samples(tmp_path / "data.jsonl") == [SAMPLE, second]


@pytest.mark.parametrize("label_mask", ["original", "assistant_only"])
def test_lazy_and_eager_datasets_agree_and_batches_pad_to_the_longest(tokenizer, label_mask):
    samples = [SAMPLE, {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}]
    eager = ConversationDataset(samples, tokenizer, max_length=512, label_mask=label_mask)
    lazy = ConversationDataset(samples, tokenizer, max_length=512, lazy=True, label_mask=label_mask)
    assert [eager[i] for i in range(2)] == [lazy[i] for i in range(2)]
    assert [eager[i]["labels"] for i in range(2)] == [tokenize_sample(tokenizer, s, label_mask=label_mask).labels
                                                      for s in samples]
    batch = PadToLongest(pad_token_id=tokenizer.eod_id)([eager[0], eager[1]])
    longest = len(eager[0]["input_ids"])
    assert batch["input_ids"].shape == (2, longest)  # padded to this batch, not to max_length
    short = len(eager[1]["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (longest - short)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tokenizer.eod_id).all()
    assert batch["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"id": "a1"}, "sample 'a1' (#0) has no 'conversations' list"),
        ({"id": "a2", "conversations": []}, "sample 'a2' (#0) has an empty conversation"),
        ({"id": "a3", "conversations": [{"from": "human", "value": "hi"}]}, "unknown role 'human'"),
        ({"id": "a4", "conversations": [{"from": "user", "value": "hi"}]}, "sample 'a4' (#0) has no assistant turn"),
        ({"id": "a5", "conversations": [{"from": "user"}]}, "turn 0: each turn needs 'from' and 'value'"),
        ({"id": "a6", "conversations": [{"from": "assistant", "value": 3}]}, "'value' must be a string"),
        # The opening assistant turn is left out (as the original did), which leaves no reply to learn.
        ({"id": "a7", "conversations": [{"from": "assistant", "value": "Hello!"}, {"from": "user", "value": "Bye."}]},
         "sample 'a7' (#0) has no assistant turn after its opening one, which is not trained on, so there is nothing "
         "to learn from it."),
        ("just text", "sample #0 is a str"),
    ],
)
def test_bad_samples_are_named(tmp_path, sample, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([sample]))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_samples(path)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "missing.json")
    (tmp_path / "broken.jsonl").write_text('{"conversations": []}\n{oops\n')
    with pytest.raises(DataError, match="broken.jsonl, line 2: not valid JSON"):
        load_samples(tmp_path / "broken.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="holds no samples"):
        load_samples(tmp_path / "empty.json")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    sample = {"conversations": [{"from": "user", "value": "Grüße"}, {"from": "assistant", "value": "Hallo"}]}
    good = json.dumps(sample, ensure_ascii=False)
    (tmp_path / "cp1252.jsonl").write_bytes((good + "\n" + good + "\n").encode("utf-8") + good.encode("cp1252"))
    with pytest.raises(DataError, match=r"cp1252.jsonl, line 3: not UTF-8 text \(byte 0xfc at offset \d+\); save"):
        load_samples(tmp_path / "cp1252.jsonl")
    # A byte-order mark, as some Windows editors write at the start of UTF-8 files, is not part of the data.
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([sample], ensure_ascii=False).encode("utf-8"))
    assert load_samples(tmp_path / "bom.json") == [sample]


LONG_PROMPT = {"id": "long", "conversations": [{"from": "user", "value": "word " * 50},
                                               {"from": "assistant", "value": "ok"}]}


def test_under_the_assistant_only_mask_a_sample_whose_reply_starts_beyond_max_length_is_left_out(tokenizer):
    from qwen.sft import first_label_position

    first = first_label_position(tokenizer, LONG_PROMPT, "assistant_only")
    full = tokenize_sample(tokenizer, LONG_PROMPT, label_mask="assistant_only")
    assert full.labels[first] != IGNORE_INDEX and set(full.labels[:first]) == {IGNORE_INDEX}
    assert tokenizer.decode(full.input_ids[first - 3 : first]) == "<|im_start|>assistant\n"  # the reply's start
    for lazy in (False, True):
        dataset = ConversationDataset([SAMPLE, LONG_PROMPT], tokenizer, max_length=first, lazy=lazy,
                                      label_mask="assistant_only")
        assert len(dataset) == 1 and dataset[0] == ConversationDataset([SAMPLE], tokenizer, first, lazy=lazy,
                                                                       label_mask="assistant_only")[0]
        assert [(s.index, s.name, s.length, s.first_label) for s in dataset.left_out] == [
            (1, "sample 'long' (#1)", len(full.input_ids), first)
        ]
        kept = ConversationDataset([LONG_PROMPT], tokenizer, max_length=first + 1, lazy=lazy,
                                   label_mask="assistant_only")
        assert len(kept) == 1 and not kept.left_out and kept[0]["labels"][-1] != IGNORE_INDEX


def test_under_the_original_mask_a_cut_reply_still_trains_the_turn_markers_as_the_original_did(tokenizer):
    """The original script trained on every sample; under its mask only one cut inside its system turn has nothing
    left to learn (and is left out)."""
    from qwen.sft import first_label_position

    reply_start = first_label_position(tokenizer, LONG_PROMPT, "assistant_only")
    first = first_label_position(tokenizer, LONG_PROMPT)
    assert tokenizer.decode(tokenize_sample(tokenizer, LONG_PROMPT).input_ids[first]) == "<|im_end|>"  # the system's
    for lazy in (False, True):
        cut_reply = ConversationDataset([LONG_PROMPT], tokenizer, max_length=reply_start, lazy=lazy)
        assert len(cut_reply) == 1 and not cut_reply.left_out
        cut_system = ConversationDataset([SAMPLE, LONG_PROMPT], tokenizer, max_length=first, lazy=lazy)
        assert len(cut_system) == 0 and [s.first_label for s in cut_system.left_out] == [first, first]
        assert len(ConversationDataset([LONG_PROMPT], tokenizer, max_length=first + 1, lazy=lazy)) == 1

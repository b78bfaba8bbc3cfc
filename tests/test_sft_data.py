"""Fine-tuning data: the file formats, the ChatML ids chat() would feed, the assistant-only label mask, bad samples."""

from __future__ import annotations

import json

import pytest
import torch

from qwen.qwen_generation_utils import chatml_ids_for_messages, make_context
from qwen.sft import IGNORE_INDEX, ConversationDataset, DataError, PadToLongest, load_samples, tokenize_sample

SAMPLE = {
    "id": "identity_0",
    "conversations": [
        {"from": "user", "value": "你好"},
        {"from": "assistant", "value": "我是通义千问，一个语言模型。"},
        {"from": "user", "value": " 2+2? "},
        {"from": "assistant", "value": "4"},
    ],
}


def test_ids_are_the_chat_prompt_and_labels_cover_only_replies(tokenizer):
    item = tokenize_sample(tokenizer, SAMPLE)
    messages = [{"role": t["from"], "content": t["value"]} for t in SAMPLE["conversations"]]
    assert item.input_ids == chatml_ids_for_messages(tokenizer, messages, add_generation_prompt=False)[1]
    # The second turn's prompt is exactly what chat() builds with the first turn as history.
    _, prompt = make_context(tokenizer, " 2+2? ", history=[("你好", "我是通义千问，一个语言模型。")],
                             system="You are a helpful assistant.")
    assert item.input_ids[: len(prompt)] == prompt

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
    assert tokenizer.decode(item.input_ids[spans[0][1]:spans[0][1] + 1]) == "\n"  # the newline after: unlabelled
    assert spans[1][1] == len(item.input_ids)  # the conversation ends with the last reply's <|im_end|>


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


def test_lazy_and_eager_datasets_agree_and_batches_pad_to_the_longest(tokenizer):
    samples = [SAMPLE, {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}]
    eager = ConversationDataset(samples, tokenizer, max_length=512)
    lazy = ConversationDataset(samples, tokenizer, max_length=512, lazy=True)
    assert [eager[i] for i in range(2)] == [lazy[i] for i in range(2)]
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


def test_samples_whose_reply_starts_beyond_max_length_are_left_out_lazily_or_not(tokenizer):
    from qwen.sft import first_label_position

    long_prompt = {"id": "long", "conversations": [{"from": "user", "value": "word " * 50},
                                                    {"from": "assistant", "value": "ok"}]}
    first = first_label_position(tokenizer, long_prompt)
    full = tokenize_sample(tokenizer, long_prompt)
    assert full.labels[first] != IGNORE_INDEX and set(full.labels[:first]) == {IGNORE_INDEX}
    for lazy in (False, True):
        dataset = ConversationDataset([SAMPLE, long_prompt], tokenizer, max_length=first, lazy=lazy)
        assert len(dataset) == 1 and dataset[0]["input_ids"] == tokenize_sample(tokenizer, SAMPLE, first).input_ids
        assert [(s.index, s.name, s.length, s.first_label) for s in dataset.left_out] == [
            (1, "sample 'long' (#1)", len(full.input_ids), first)
        ]
        kept = ConversationDataset([long_prompt], tokenizer, max_length=first + 1, lazy=lazy)
        assert len(kept) == 1 and not kept.left_out and kept[0]["labels"][-1] != IGNORE_INDEX

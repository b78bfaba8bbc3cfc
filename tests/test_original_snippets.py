"""The model API as code written for the released Qwen (v1) model calls it: the original README's batch inference,
positional arguments in the released order, and the keyword arguments the released classes took."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from qwen import QWenConfig, QWenLMHeadModel
from qwen.checkpoint import install_code
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, make_context
from support import STOP_IDS, checkout_env, greedy_reference
from trained_checkpoint import chat_turn, memorizing_checkpoint_cached

GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)

# Questions of different lengths (so that the batch is really left-padded) and the replies a checkpoint is trained on.
BATCH_EXCHANGES = (
    ("Say something kind.", "You are doing better than you think."),
    ("推荐一道不太甜的甜点，要简单易做的。", "试试桂花糖藕，甜而不腻。"),
    ("我马上要迟到了，现在应该先做什么？", "先给对方发消息说明情况，再安全地赶路。"),
)

# The "Batch Inference" section of the original README, call for call: the tokenizer with a pad token distinct from
# <|endoftext|> and left padding, `from_pretrained(..., pad_token_id=...)`, the generation config reloaded with that
# pad id, text prompts from make_context padded with `padding='longest'`, generate() without an attention mask (it is
# derived from the pad id), and decode_tokens() on each row without its padding. Then chat() on each question, as the
# section ends. {imports} and {remote} select how the classes are found; the checkpoint folder is the working directory.
BATCH_INFERENCE = """
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import GenerationConfig
{imports}

questions = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(
    "./", pad_token="<|extra_0|>", eos_token="<|endoftext|>", padding_side="left"{remote}
)
model = AutoModelForCausalLM.from_pretrained(
    "./", pad_token_id=tokenizer.pad_token_id, device_map="auto"{remote}
).eval()
model.generation_config = GenerationConfig.from_pretrained("./", pad_token_id=tokenizer.pad_token_id)

prompts = []
for question in questions:
    prompt, _ = make_context(
        tokenizer,
        question,
        system="You are a helpful assistant.",
        max_window_size=model.generation_config.max_window_size,
        chat_format=model.generation_config.chat_format,
    )
    prompts.append(prompt)

encoded = tokenizer(prompts, padding="longest")
input_ids = torch.LongTensor(encoded["input_ids"]).to(model.device)
output_ids = model.generate(input_ids, return_dict_in_generate=False, generation_config=model.generation_config)
padding = [input_ids[i].eq(tokenizer.pad_token_id).sum().item() for i in range(input_ids.size(0))]
batch_replies = [
    decode_tokens(
        output_ids[i][padding[i]:],
        tokenizer,
        raw_text_len=len(prompts[i]),
        context_length=input_ids[i].size(0) - padding[i],
        chat_format="chatml",
        verbose=False,
        errors="replace",
    )
    for i in range(len(questions))
]
chat_replies = [model.chat(tokenizer, question, history=None)[0] for question in questions]
print(json.dumps({{
    "batch": batch_replies, "chat": chat_replies, "padding": padding,
    "model_module": type(model).__module__, "qwen_imported": "qwen" in sys.modules,
}}))
"""

ROUTES = {
    # This repository's way: the installed package registers the classes; nothing in the folder runs.
    "installed-package": dict(
        imports="import qwen\nfrom qwen.qwen_generation_utils import make_context, decode_tokens, get_stop_words_ids",
        remote="",
    ),
    # The original README's way, after `install-code`: the folder's own files, imported from the working directory.
    "remote-code": dict(
        imports="from qwen_generation_utils import make_context, decode_tokens, get_stop_words_ids",
        remote=", trust_remote_code=True",
    ),
}


@pytest.fixture(scope="module")
def batch_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny chat checkpoint trained to answer BATCH_EXCHANGES, its generation config made greedy and short."""
    conversations = [chat_turn(tokenizer, question, reply) for question, reply in BATCH_EXCHANGES]
    trained = memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations)
    folder = tmp_path_factory.mktemp("batch") / "checkpoint"
    shutil.copytree(trained, folder)
    path = folder / "generation_config.json"
    # The released file samples (top_p=0.8) and allows 512 new tokens: greedy and 32 tokens run the same calls.
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": False, "max_new_tokens": 32}))
    return folder


@pytest.mark.parametrize("route", list(ROUTES))
def test_original_batch_inference_gives_each_row_its_chat_reply(batch_checkpoint, tmp_path, route):
    folder = tmp_path / "checkpoint"
    shutil.copytree(batch_checkpoint, folder)
    if route == "remote-code":
        install_code(folder)
    questions = [question for question, _ in BATCH_EXCHANGES]
    result = subprocess.run(
        [sys.executable, "-c", BATCH_INFERENCE.format(**ROUTES[route]), json.dumps(questions)],
        cwd=folder, env=checkout_env(HF_MODULES_CACHE=str(tmp_path / "modules")), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if route == "remote-code":
        assert report["model_module"].startswith("transformers_modules"), report["model_module"]
        assert not report["qwen_imported"], "the remote-code route must not import the installed qwen package"
    else:
        assert report["model_module"] == "qwen.modeling_qwen"
    padding = report["padding"]
    assert len(set(padding)) == len(padding) and min(padding) == 0, "each question should get its own left padding"
    assert report["batch"] == report["chat"] == [reply for _, reply in BATCH_EXCHANGES]


def test_config_takes_the_special_token_ids_from_from_pretrained(tiny_chat_dir, released_dir):
    config, unused = QWenConfig.from_pretrained(tiny_chat_dir, pad_token_id=151646, return_unused_kwargs=True)
    assert unused == {} and config.pad_token_id == 151646
    assert (QWenConfig().pad_token_id, QWenConfig().bos_token_id, QWenConfig().eos_token_id) == (None, None, None)
    # Unset, they stay out of the config.json a checkpoint is written with, as in the released files.
    written = json.loads((tiny_chat_dir / "config.json").read_text())
    assert not {"pad_token_id", "bos_token_id", "eos_token_id"} & set(written)
    # The Aug-2023 config.json sets both to <|endoftext|>.
    august = QWenConfig.from_pretrained(released_dir / "Qwen-7B-Chat-2023-08")
    assert (august.bos_token_id, august.eos_token_id) == (151643, 151643)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, pad_token_id=151646, bos_token_id=151643)
    assert (model.config.pad_token_id, model.config.bos_token_id) == (151646, 151643)


def parameter_names(method) -> list[str]:
    return [name for name, parameter in inspect.signature(method).parameters.items()
            if parameter.kind == parameter.POSITIONAL_OR_KEYWORD]


def test_positional_parameters_are_in_the_released_order():
    assert parameter_names(QWenLMHeadModel.chat) == [
        "self", "tokenizer", "query", "history", "system", "stream", "stop_words_ids", "generation_config"]
    assert parameter_names(QWenLMHeadModel.chat_stream) == [
        "self", "tokenizer", "query", "history", "system", "stop_words_ids", "logits_processor", "generation_config"]
    assert parameter_names(QWenLMHeadModel.generate) == ["self", "inputs", "generation_config", "logits_processor"]


class CountCalls(LogitsProcessor):
    """A caller's own logits processor: leaves the scores alone and counts the steps it saw."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.calls += 1
        return scores


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_chat_stream_and_generate_take_the_released_positional_arguments(tiny_chat_model, tokenizer):
    query = "Tell me a story"
    _, prompt_ids = make_context(tokenizer, query, system=DEFAULT_SYSTEM_PROMPT)
    free_run = greedy_reference(tiny_chat_model, tokenizer, prompt_ids, 8)
    assert len(free_run) == 8
    stop_at = free_run[2]
    cut = free_run[: free_run.index(stop_at) + 1]  # a stop word ends the reply right after it
    config = GenerationConfig(chat_format="chatml", max_new_tokens=8, eos_token_id=151643, pad_token_id=151643,
                              **GREEDY)

    counter = CountCalls()
    pieces = list(tiny_chat_model.chat_stream(
        tokenizer, query, None, DEFAULT_SYSTEM_PROMPT, [[stop_at]], LogitsProcessorList([counter]), config))
    assert pieces[-1] == tokenizer.decode(cut).strip()
    assert counter.calls == len(cut) + 1  # every generated token, and the <|endoftext|> forced after the stop word
    by_keyword, _ = tiny_chat_model.chat(tokenizer, query, history=None, stop_words_ids=[[stop_at]],
                                         generation_config=config)
    assert by_keyword == pieces[-1]

    # generate(inputs, generation_config, logits_processor, stopping_criteria, ...), as transformers and the released
    # model order them.
    ids = torch.tensor([prompt_ids])
    out = tiny_chat_model.generate(ids, config, None, StoppingCriteriaList([StopAtLength(ids.shape[1] + 3)]))
    assert out[0, ids.shape[1]:].tolist() == free_run[:3]


def test_chat_refuses_a_fifth_positional_argument_naming_chat_stream(tiny_chat_model, tokenizer):
    # The released chat()'s fifth parameter is `stream`, which only ever refused; earlier versions of this repository
    # read a generation config there.
    config = GenerationConfig(chat_format="chatml", max_new_tokens=2, eos_token_id=151643, pad_token_id=151643)
    for fifth in (config, True, False, None):
        with pytest.raises(TypeError, match=r"chat_stream\("):
            tiny_chat_model.chat(tokenizer, "hi", None, DEFAULT_SYSTEM_PROMPT, fifth)
    with pytest.raises(TypeError, match=r"chat_stream\("):
        tiny_chat_model.chat(tokenizer, "hi", history=None, stream=True)
    response, history = tiny_chat_model.chat(tokenizer, "hi", None, DEFAULT_SYSTEM_PROMPT, generation_config=config,
                                             append_history=False, **GREEDY)
    assert isinstance(response, str) and history == []


def test_a_reply_cut_by_max_new_tokens_keeps_its_last_token(tiny_chat_model, tokenizer):
    # The released _decode_chatml dropped the last token of a reply that ran into max_new_tokens.
    query, limit = "Tell me a story", 6
    _, prompt_ids = make_context(tokenizer, query, system=DEFAULT_SYSTEM_PROMPT)
    generated = greedy_reference(tiny_chat_model, tokenizer, prompt_ids, limit)
    assert len(generated) == limit and not STOP_IDS & set(generated), "the reply must run into the limit"
    response, _ = tiny_chat_model.chat(tokenizer, query, history=None, max_new_tokens=limit, **GREEDY)
    assert response == tokenizer.decode(generated).strip()
    assert response != tokenizer.decode(generated[:-1]).strip(), "pick a query whose last token is not whitespace"

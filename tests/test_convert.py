"""`python -m qwen.convert`: the Qwen2ForCausalLM checkpoint it writes computes what ours computes within seq_length,
its tokenizer gives our ids, sharded and .bin sources convert, and bad inputs end with one `error:` line."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from qwen import QWenLMHeadModel
from qwen.checkpoint import write_random_checkpoint
from qwen.convert import main as convert_main

FIXTURES = Path(__file__).parent / "fixtures"


def convert(src: Path, dst: Path, *options: str) -> None:
    """Run the command-line entry point in this process (the CLI is what users call)."""
    assert convert_main([str(src), str(dst), *options]) == 0


def convert_error(capsys, *argv: str) -> str:
    """The one line a failed conversion prints; also checks the exit code and that no traceback was printed."""
    with pytest.raises(SystemExit) as exit_info:
        convert_main(list(argv))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def converted_chat(tmp_path_factory, tiny_chat_dir) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "tiny-chat-qwen2"
    convert(tiny_chat_dir, dst)
    return dst


@pytest.fixture(scope="module")
def hf_tokenizer(converted_chat):
    return AutoTokenizer.from_pretrained(converted_chat)


# ---------------------------------------------------------------------------------------------------------------------
# Layout and configs


def test_folder_layout_and_configs(converted_chat, tiny_chat_dir):
    assert sorted(p.name for p in converted_chat.iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "qwen.tiktoken",
        "tokenizer.json", "tokenizer_config.json", "vocab.json",
    ]
    assert not list(converted_chat.parent.glob(".*partial*")), "the staging folder was left behind"
    config = json.loads((converted_chat / "config.json").read_text())
    source = json.loads((tiny_chat_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["max_position_embeddings"] == source["seq_length"] == 256
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == source["rotary_emb_base"]
    assert config["intermediate_size"] == source["intermediate_size"] // 2
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)

    generation = json.loads((converted_chat / "generation_config.json").read_text())
    # A chat reply ends at <|im_end|> (or a new <|im_start|>), as in chat(); <|endoftext|> ends any text.
    assert generation["eos_token_id"] == [151645, 151644, 151643]
    assert generation["pad_token_id"] == 151643
    assert {k: generation[k] for k in ("top_p", "top_k", "repetition_penalty", "do_sample", "max_new_tokens")} == {
        "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "do_sample": True, "max_new_tokens": 512}
    assert generation["chat_format"] == "chatml"

    tokenizer_config = json.loads((converted_chat / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["bos_token"] is None
    assert len(tokenizer_config["added_tokens_decoder"]) == 208
    merges = (converted_chat / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1] == "Ġ Ġ"  # rank 220 + 220 -> 256, the first merge


@pytest.mark.parametrize("name, shapes", [
    # (hidden, layers, heads, intermediate, seq_length, rotary base, vocab) from the released config.json files
    ("Qwen-72B", (8192, 80, 64, 24576, 8192, 1_000_000.0, 152064)),
    ("Qwen-7B-Chat-2023-08", (4096, 32, 32, 11008, 2048, 10000.0, 151936)),  # the Aug-2023 field names
])
def test_released_configs_map_to_qwen2(name, shapes):
    from transformers import Qwen2Config

    from qwen.configuration_qwen import QWenConfig
    from qwen.convert import qwen2_config_json

    raw = json.loads((FIXTURES / "released" / name / "config.json").read_text())
    config = QWenConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "auto_map")})
    data = qwen2_config_json(config, torch.bfloat16, chat=True)
    hidden, layers, heads, intermediate, seq_length, theta, vocab = shapes
    assert (data["hidden_size"], data["num_hidden_layers"], data["num_attention_heads"], data["num_key_value_heads"],
            data["intermediate_size"], data["max_position_embeddings"], data["vocab_size"]) == (
        hidden, layers, heads, heads, intermediate, seq_length, vocab)
    # Both spellings of the rotary base: transformers 4.x readers fall back to 10000 without rope_theta.
    assert data["rope_theta"] == data["rope_parameters"]["rope_theta"] == theta
    reloaded = Qwen2Config(**{k: v for k, v in data.items() if k != "transformers_version"})
    assert reloaded.rope_parameters["rope_theta"] == theta and reloaded.dtype == torch.bfloat16


def test_expected_tensors_are_those_of_the_released_72b_index():
    # The names and shapes the converter demands, checked against the real Qwen-72B weight index: the same 643
    # names, and shapes that add up to its stored bf16 size.
    import math

    from qwen.configuration_qwen import QWenConfig
    from qwen.convert import _expected_source_shapes

    raw = json.loads((FIXTURES / "released" / "Qwen-72B" / "config.json").read_text())
    index = json.loads((FIXTURES / "released" / "Qwen-72B" / "model.safetensors.index.json").read_text())
    expected = _expected_source_shapes(QWenConfig(**{k: v for k, v in raw.items() if k != "auto_map"}))
    assert set(expected) == set(index["weight_map"])
    assert 2 * sum(math.prod(shape) for shape in expected.values()) == index["metadata"]["total_size"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_class_specials_and_released_ids(hf_tokenizer, tokenizer_facts):
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(hf_tokenizer) == tokenizer_facts["vocab_size_with_specials"] == 151851
    for token, index in tokenizer_facts["special_tokens"].items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == index
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id) == (151645, 151643, None)
    for text, ids in tokenizer_facts["encode"].items():
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    special = tokenizer_facts["encode_special_string_default"]
    assert hf_tokenizer(special["text"])["input_ids"] == special["ids"]


MIXED_CORPUS = [
    "北京是中国的首都。上海是最大的城市，人口超过两千万！",
    "混合 English 和中文 mixed text, 数字 12345 与标点：“引号”《书名》",
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))\r\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;   -- comment",
    "emoji 🤖🦄🇨🇳👩‍👩‍👧‍👦 ✨❤️ and kaomoji (╯°□°）╯︵ ┻━┻",
    "  leading\n\n\n   trailing   \n \t\t \r\n\r\n\u3000\u3000全角空格\xa0nbsp  ",
    " " * 37 + "x" + "\n" * 9 + "\t" * 5,
    "I'M HERE, they'll go, WE'VE done it, it's 'quoted' isn't it",
    "e\u0301 vs \u00e9, Å vs A\u030a, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ①②③, ½, ２０２４年",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, 한국어, 日本語のテキスト",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|><|extra_0|><|extra_204|>",
    "not special: <|im_start |> <|extra_205|> <im_end> |im_end|",
    "3.14159265358979 1e-10 0x1F -42 1,000,000 99.9%",
    "https://example.com/path?query=1&b=2#frag user@example.org C:\\Windows\\System32",
]


def _random_texts(count: int, seed: int) -> list[str]:
    """Random mixtures of scripts, emoji, combining marks, digits, punctuation and whitespace runs."""
    pools = [(0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0300, 0x036F), (0x20, 0x7E), (0xC0, 0x24F), (0x3000, 0x303F),
             (0xFF00, 0xFFEF), (0x400, 0x4FF), (0x600, 0x6FF), (0xAC00, 0xD7A3), (0x30, 0x39)]
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", "\u3000", "\xa0", " \t "]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.25:
                parts.append(rng.choice(spaces))
            else:
                low, high = rng.choice(pools)
                parts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6))))
        texts.append("".join(parts))
    return texts


def test_ids_equal_ours_on_a_mixed_corpus(hf_tokenizer, tokenizer):
    for text in MIXED_CORPUS + _random_texts(400, seed=0):
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, repr(text)
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)


def test_every_vocabulary_token_encodes_to_itself_as_ours_does(hf_tokenizer, tokenizer):
    # Each BPE token that is text on its own, encoded alone: the merges must rebuild it exactly where tiktoken does.
    texts = []
    for token in tokenizer.mergeable_ranks:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.is_normalized("NFC", text):
            texts.append(text)
    assert len(texts) > 140_000
    ours = [tokenizer.tokenizer.encode_ordinary(text) for text in texts]
    theirs = [encoding.ids for encoding in hf_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    mismatches = [text for text, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:10]


@pytest.mark.slow
def test_ids_equal_ours_on_real_source_files(hf_tokenizer, tokenizer):
    # Python's standard library (code, docstrings, unicode tables) and this repository's text: ~20 MB of real files.
    import sysconfig

    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:2000]
    paths += [p for p in Path(__file__).resolve().parent.parent.rglob("*") if p.suffix in (".md", ".py", ".json")]
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    ours = [tokenizer.encode(text) for text in texts]
    theirs = [e.ids for e in hf_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [text[:80] for text, a, b in zip(texts, ours, theirs) if a != b] == []


def test_chat_template_ids_equal_our_chatml(hf_tokenizer, tokenizer, tokenizer_facts):
    from qwen.qwen_generation_utils import make_context

    for case in tokenizer_facts["chatml_prompts"]:
        messages = [{"role": "system", "content": case["system"]}]
        for query, response in case["history"] or []:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": case["query"]})
        text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == case["prompt_text"]
        assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == case["prompt_ids"]

    # Without a system message both add the default one; without the generation prompt both end at the last turn.
    history = [("写一首关于春天的诗", "春风拂面，\n桃花盛开。"), ("Translate it to English.", "Spring breeze on the face,\npeach blossoms.")]
    text, ids = make_context(tokenizer, "Thanks! 🙏", history=history, system="You are a helpful assistant.")
    messages = []
    for query, response in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    messages.append({"role": "user", "content": "Thanks! 🙏"})
    assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == ids
    assert (hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False)["input_ids"]
            == tokenizer.apply_chat_template(messages, add_generation_prompt=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def _random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151643, (batch, length), generator=generator)


@torch.no_grad()
def test_logits_equal_ours_within_seq_length(converted_chat, tiny_chat_model):
    qwen2 = Qwen2ForCausalLM.from_pretrained(converted_chat).eval()
    assert qwen2.dtype == torch.float32
    ids = _random_ids(1, tiny_chat_model.config.seq_length, seed=0)  # up to exactly seq_length tokens
    ours = tiny_chat_model(ids, use_cache=False).logits
    theirs = qwen2(ids, use_cache=False).logits
    assert ours.abs().max() > 0.1  # the comparison below is not between two near-zero tensors
    # Rounding only (~2e-7 here); a max over the difference, since assert_close takes seconds on 39M logits.
    within = (theirs - ours).abs().max()
    assert within < 2e-6

    # One token past seq_length ours switches on dynamic NTK and logn scaling, which Qwen2 lacks, and the outputs
    # part (the documented difference: if this starts failing, the docs are wrong). On this near-flat random model
    # the gap is ~1e-3, thousands of times the rounding noise above.
    assert tiny_chat_model.config.use_dynamic_ntk and tiny_chat_model.config.use_logn_attn
    longer = _random_ids(1, tiny_chat_model.config.seq_length + 1, seed=1)
    past = (qwen2(longer, use_cache=False).logits - tiny_chat_model(longer, use_cache=False).logits).abs().max()
    assert past > 1e-4 and past > 100 * within


@torch.no_grad()
def test_sharded_bfloat16_base_source(tmp_path, capsys):
    src = write_random_checkpoint(tmp_path / "src", size="tiny", chat=False, seed=3, dtype=torch.bfloat16,
                                  max_shard_size="3MB")
    assert len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    dst = tmp_path / "dst"
    convert(src, dst, "--max-shard-size", "4MB")
    assert "wrote shard 3" in capsys.readouterr().out

    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    stored = {}
    for shard in shards:
        tensors = load_file(dst / shard)
        # At most 4 MB per file, unless one tensor alone is larger (the 9.7 MB embeddings and head).
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 4_000_000
        stored.update(tensors)
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # the source's precision, kept

    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["eos_token_id"] == 151643
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151643 and generation["chat_format"] == "raw"
    assert json.loads((dst / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"

    ours = QWenLMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
    qwen2 = Qwen2ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = _random_ids(1, 64, seed=2)
    torch.testing.assert_close(qwen2(ids).logits, ours(ids).logits, atol=2e-5, rtol=1e-5)


def test_pytorch_bin_source_and_dtype_option(tmp_path, tiny_chat_dir, tiny_chat_model, converted_chat):
    src = tmp_path / "bin"
    shutil.copytree(tiny_chat_dir, src)
    (src / "model.safetensors").unlink()
    torch.save(tiny_chat_model.state_dict(), src / "pytorch_model.bin")
    (tmp_path / "dst").mkdir()  # an existing empty folder is a valid destination
    convert(src, tmp_path / "dst", "--dtype", "bfloat16")
    with safe_open(tmp_path / "dst" / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # transformers checks it before trusting the file
    converted = load_file(tmp_path / "dst" / "model.safetensors")
    reference = load_file(converted_chat / "model.safetensors")
    assert converted.keys() == reference.keys()
    for name, tensor in converted.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, reference[name].to(torch.bfloat16), atol=0, rtol=0)
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_inputs_that_are_not_convertible_fail_with_one_line(tmp_path, capsys, tiny_chat_dir):
    dst = str(tmp_path / "dst")
    assert "is not a folder" in convert_error(capsys, str(tmp_path / "missing"), dst)
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in convert_error(capsys, str(tmp_path / "empty"), dst)

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    assert "holds a 'llama' model, not a Qwen (v1) one" in convert_error(capsys, str(llama), dst)

    gptq = tmp_path / "int4"
    shutil.copytree(FIXTURES / "released" / "Qwen-VL-Chat-Int4", gptq)
    assert "GPTQ-quantized checkpoint" in convert_error(capsys, str(gptq), dst)

    # The released Qwen-72B index without its 19 shard files: refused before anything is written.
    partial = tmp_path / "72b"
    shutil.copytree(FIXTURES / "released" / "Qwen-72B", partial)
    shutil.copyfile(tiny_chat_dir / "qwen.tiktoken", partial / "qwen.tiktoken")
    message = convert_error(capsys, str(partial), dst)
    assert "lacks weight files its index names: model-00001-of-00019.safetensors" in message

    already = tmp_path / "already"
    already.mkdir()
    (already / "config.json").write_text('{"model_type": "qwen2"}')
    assert "already in the Qwen2 layout" in convert_error(capsys, str(already), dst)
    assert not (tmp_path / "dst").exists()


def test_damaged_sources_fail_with_one_line(tmp_path, capsys, tiny_chat_dir):
    dst = str(tmp_path / "dst")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_chat_dir, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    assert "lacks 1 tensors the config calls for, e.g. lm_head.weight" in convert_error(capsys, str(incomplete), dst)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_chat_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    assert "config.json implies" in convert_error(capsys, str(mismatched), dst)

    bad_vocab = tmp_path / "bad-vocab"
    shutil.copytree(tiny_chat_dir, bad_vocab)
    with open(bad_vocab / "qwen.tiktoken", "ab") as handle:
        handle.write(b"IQ== 999999\n")
    assert "is damaged or is not the released Qwen vocabulary" in convert_error(capsys, str(bad_vocab), dst)

    partial_rotary = tmp_path / "rotary"
    shutil.copytree(tiny_chat_dir, partial_rotary)
    (partial_rotary / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.5}))
    assert "rotary_pct < 1 cannot be converted" in convert_error(capsys, str(partial_rotary), dst)
    assert not (tmp_path / "dst").exists()


def test_destination_and_options_are_checked_first(tmp_path, capsys, tiny_chat_dir):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert "exists and is not empty" in convert_error(capsys, str(tiny_chat_dir), str(occupied))
    assert (occupied / "keep.txt").read_text() == "mine"
    assert "is not a size" in convert_error(capsys, str(tiny_chat_dir), str(tmp_path / "new"), "--max-shard-size",
                                            "lots")
    assert "must be positive" in convert_error(capsys, str(tiny_chat_dir), str(tmp_path / "new"), "--max-shard-size",
                                               "0")
    assert not (tmp_path / "new").exists()



# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp, where a checkout is at hand


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="set LLAMA_CPP_DIR to a llama.cpp checkout (with its "
                    "Python requirements, sentencepiece included) to run its converter on our output")
def test_llama_cpp_converter_reads_the_output(converted_chat, tmp_path, tokenizer):
    gguf_file = tmp_path / "tiny.gguf"
    llama_cpp_dir = Path(os.environ["LLAMA_CPP_DIR"])
    result = subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(converted_chat),
                             "--outfile", str(gguf_file), "--outtype", "f32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    sys.path.insert(0, str(llama_cpp_dir / "gguf-py"))
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields

    def value(key: str):
        field = fields[key]
        data = field.parts[field.data[0]]
        return bytes(data).decode() if field.types[0].name == "STRING" else data.tolist()[0]

    # "qwen2" means llama.cpp recognised our pre-tokenizer by hashing the ids of its test text.
    assert (value("general.architecture"), value("tokenizer.ggml.pre")) == ("qwen2", "qwen2")
    assert value("tokenizer.ggml.eos_token_id") == 151645 and value("tokenizer.ggml.add_bos_token") is False

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; GGUF written and read")
    model = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    # llama.cpp skips the NFC normalizer: compare on normalized text, which is what it gets right.
    for text in MIXED_CORPUS + _random_texts(300, seed=1):
        text = unicodedata.normalize("NFC", text)
        assert model.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), repr(text)

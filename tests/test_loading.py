"""Checkpoint folders in the released layout: our classes, Auto classes, remote code, old configs, dtypes, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwen import QWenLMHeadModel, QWenTokenizer
from qwen.checkpoint import REMOTE_CODE_FILES, install_code, write_random_checkpoint
from support import REPO, import_script

PROMPT_IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 9707, 11, 1879, 0]])


def logits_of(model: QWenLMHeadModel) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS, use_cache=False).logits.float()


def test_folder_has_released_files_only(tiny_chat_dir):
    names = sorted(p.name for p in tiny_chat_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken",
                     "tokenizer_config.json"]
    config = json.loads((tiny_chat_dir / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert "id2label" not in config


def test_our_classes_load_the_folder(tiny_chat_dir, tiny_chat_model):
    assert isinstance(tiny_chat_model, QWenLMHeadModel)
    assert tiny_chat_model.dtype == torch.float32
    assert tiny_chat_model.generation_config.chat_format == "chatml"
    tokenizer = QWenTokenizer.from_pretrained(tiny_chat_dir)
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_auto_classes_without_remote_code(tiny_chat_dir, tiny_chat_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    assert type(model) is QWenLMHeadModel and type(tokenizer) is QWenTokenizer
    torch.testing.assert_close(logits_of(model), logits_of(tiny_chat_model), atol=0, rtol=0)


def test_sharded_safetensors_and_pytorch_bin_load_the_same_weights(tmp_path, tiny_chat_dir, tiny_chat_model):
    sharded = write_random_checkpoint(tmp_path / "sharded", size="tiny", seed=0, max_shard_size="5MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(logits_of(QWenLMHeadModel.from_pretrained(sharded)), logits_of(tiny_chat_model))

    as_bin = tmp_path / "bin"
    shutil.copytree(tiny_chat_dir, as_bin)
    (as_bin / "model.safetensors").unlink()
    torch.save(tiny_chat_model.state_dict(), as_bin / "pytorch_model.bin")
    torch.testing.assert_close(logits_of(QWenLMHeadModel.from_pretrained(as_bin)), logits_of(tiny_chat_model))

    # Sharded .bin files with an index, as the August 2023 checkpoints were published.
    as_bin_shards = tmp_path / "bin-shards"
    shutil.copytree(as_bin, as_bin_shards)
    (as_bin_shards / "pytorch_model.bin").unlink()
    names = list(tiny_chat_model.state_dict())
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-0000{number}-of-00002.bin"
        torch.save({name: tiny_chat_model.state_dict()[name] for name in part}, as_bin_shards / shard)
        weight_map.update({name: shard for name in part})
    (as_bin_shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.testing.assert_close(logits_of(QWenLMHeadModel.from_pretrained(as_bin_shards)), logits_of(tiny_chat_model))


def test_aug_2023_field_names_load_the_same_model(tmp_path, tiny_chat_dir, tiny_chat_model):
    old = tmp_path / "old"
    shutil.copytree(tiny_chat_dir, old)
    config = json.loads((old / "config.json").read_text())
    renames = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
               "intermediate_size": "ffn_hidden_size", "max_position_embeddings": "n_positions",
               "emb_dropout_prob": "embd_pdrop", "attn_dropout_prob": "attn_pdrop"}
    for current, legacy in renames.items():
        config[legacy] = config.pop(current)
    config.update(padded_vocab_size=config["vocab_size"], activation="swiglu", pos_emb="rotary",
                  apply_residual_connection_post_layernorm=False, params_dtype="torch.bfloat16", resid_pdrop=0.1)
    (old / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(old)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    torch.testing.assert_close(logits_of(model), logits_of(tiny_chat_model), atol=0, rtol=0)


def test_precision_flags_on_cpu(tmp_path, tiny_chat_dir, tiny_chat_model):
    bf16 = QWenLMHeadModel.from_pretrained(tiny_chat_dir, bf16=True)
    assert bf16.dtype == torch.bfloat16 and bf16.config.bf16
    reference = logits_of(tiny_chat_model)
    torch.testing.assert_close(logits_of(bf16), reference, atol=3e-2, rtol=0)
    assert QWenLMHeadModel.from_pretrained(tiny_chat_dir, fp32=True).dtype == torch.float32
    # Like the released model, no flag on a CPU means fp32, even for weights stored in bf16.
    stored_bf16 = write_random_checkpoint(tmp_path / "bf16", size="tiny", seed=0, dtype=torch.bfloat16)
    assert QWenLMHeadModel.from_pretrained(stored_bf16).dtype == torch.float32
    assert QWenLMHeadModel.from_pretrained(stored_bf16, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="only one of"):
        QWenLMHeadModel.from_pretrained(tiny_chat_dir, bf16=True, fp16=True)


def test_missing_vocab_file_is_a_clear_error(tmp_path, tiny_chat_dir):
    no_vocab = tmp_path / "no-vocab"
    shutil.copytree(tiny_chat_dir, no_vocab)
    (no_vocab / "qwen.tiktoken").unlink()
    with pytest.raises((FileNotFoundError, OSError, ValueError), match="qwen.tiktoken|qwen.vocab fetch"):
        AutoTokenizer.from_pretrained(no_vocab)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation import GenerationConfig

    folder = sys.argv[1]
    assert "qwen" not in sys.modules
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    for flags, dtype in (({"bf16": True}, torch.bfloat16), ({"fp32": True}, torch.float32), ({}, torch.float32)):
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", trust_remote_code=True, **flags).eval()
        assert model.dtype == dtype, (flags, model.dtype)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "qwen" not in sys.modules, "remote code must not import the installed qwen package"
    model.generation_config = GenerationConfig.from_pretrained(folder, trust_remote_code=True)
    response, history = model.chat(tokenizer, "你好", history=None, do_sample=False, max_new_tokens=4)
    assert history == [("你好", response)]
    print("REMOTE-OK", type(tokenizer).__module__)
    """
)


def test_install_code_then_trust_remote_code_as_in_the_original_readme(tmp_path, tiny_chat_dir):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_chat_dir, folder)
    written = install_code(folder)
    assert sorted(p.name for p in written) == sorted(REMOTE_CODE_FILES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK transformers_modules" in result.stdout


def test_generation_config_from_folder_is_honoured(tiny_chat_dir, tiny_chat_model, tokenizer):
    config = GenerationConfig.from_pretrained(tiny_chat_dir)
    assert config.chat_format == "chatml" and config.max_window_size == 6144
    config.do_sample = False
    config.max_new_tokens = 3
    config.repetition_penalty = 1.0
    response, _ = tiny_chat_model.chat(tokenizer, "hi", history=None, generation_config=config)
    assert len(tokenizer.encode(response)) <= 3


# --------------------------------------------------------------------------------------------------------------------
# qwen.loading: the one loader the server and the demos use
# --------------------------------------------------------------------------------------------------------------------


def test_loader_reads_the_folder_with_its_generation_config(tiny_chat_dir, tiny_chat_model):
    from qwen.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_chat_dir, cpu_only=True)
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training
    assert model.generation_config.chat_format == "chatml"
    torch.testing.assert_close(logits_of(model), logits_of(tiny_chat_model), rtol=0, atol=0)
    assert isinstance(tokenizer, QWenTokenizer)
    assert load_model_and_tokenizer(tiny_chat_dir, cpu_only=True, dtype="bfloat16")[0].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("no_config", "no config.json"),
        ("bad_json", "not valid JSON"),
        ("llama", "'llama' model, not a Qwen"),
        ("no_vocab", "qwen.vocab fetch"),
    ],
)
def test_loader_names_what_is_wrong_with_a_folder(tmp_path, tiny_chat_dir, breakage, message):
    from qwen.loading import CheckpointError, load_model_and_tokenizer

    folder = tmp_path / "ckpt"
    if breakage != "missing":
        shutil.copytree(tiny_chat_dir, folder)
    if breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "llama":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif breakage == "no_vocab":
        (folder / "qwen.tiktoken").unlink()
    with pytest.raises(CheckpointError, match=message):
        load_model_and_tokenizer(folder, cpu_only=True)


def test_loader_refuses_fp16_on_the_cpu_and_unknown_dtypes(tiny_chat_dir):
    from qwen.loading import LoadError, load_model_and_tokenizer

    with pytest.raises(LoadError, match="use float32 or bfloat16"):
        load_model_and_tokenizer(tiny_chat_dir, cpu_only=True, dtype="float16")
    with pytest.raises(LoadError, match="Unknown dtype"):
        load_model_and_tokenizer(tiny_chat_dir, cpu_only=True, dtype="float8")


def test_scripts_load_a_checkpoint_flagged_fp16_in_fp32_on_the_cpu_and_from_pretrained_keeps_fp16(tmp_path,
                                                                                                      tiny_chat_dir):
    # One precision policy for every script (qwen.loading.inference_dtype): a config's fp16 flag, which every released
    # -Int4 config carries, is for GPUs. from_pretrained alone honours it, as the released model did.
    from qwen.loading import inference_dtype, load_model_and_tokenizer

    folder = Path(shutil.copytree(tiny_chat_dir, tmp_path / "fp16-flag"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "fp16": True, "bf16": False, "fp32": False}))
    model, _ = load_model_and_tokenizer(folder, cpu_only=True)
    assert model.dtype == torch.float32
    assert QWenLMHeadModel.from_pretrained(folder, device_map="cpu").dtype == torch.float16
    assert inference_dtype(folder, torch.bfloat16, "cpu") == torch.bfloat16
    (folder / "config.json").write_text(json.dumps({**config, "bf16": True, "fp16": False, "fp32": False}))
    assert inference_dtype(folder, None, "cpu") == torch.bfloat16


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error(monkeypatch, tmp_path):
    from qwen.loading import CheckpointError, resolve_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here anyway; offline makes it fail at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face hub"):
        resolve_checkpoint("Qwen/Qwen-7B-Chat-that-is-not-here")


def test_demo_checkpoint_is_built_once_and_announced(tmp_path, vocab_file):
    """`-c demo` on a fresh machine: built into the cache on first use, reused after, and said to be random."""
    folder = tmp_path / "cache" / "demo"
    env = {**os.environ, "QWEN_DEMO_CHECKPOINT": str(folder), "QWEN_VOCAB_FILE": str(vocab_file)}
    script = textwrap.dedent("""
        import argparse
        from qwen.loading import add_model_arguments, load_from_args
        parser = argparse.ArgumentParser()
        add_model_arguments(parser)
        model, tokenizer = load_from_args(parser.parse_args())
        print("layers", model.config.num_hidden_layers, "vocab", len(tokenizer))
    """)
    first = subprocess.run([sys.executable, "-c", script, "-c", "demo"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "RANDOM weights" in first.stderr and "layers 2 vocab 151851" in first.stdout
    built = (folder / "model.safetensors").stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", script, "-c", "demo"], env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "RANDOM weights" in second.stderr
    assert (folder / "model.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt
    assert [p.name for p in folder.parent.iterdir()] == ["demo"]  # no staging folder left behind


def test_scripts_stop_with_one_line_for_a_bad_checkpoint(tmp_path):
    script = textwrap.dedent("""
        import argparse
        from qwen.loading import add_model_arguments, load_from_args
        parser = argparse.ArgumentParser()
        add_model_arguments(parser)
        load_from_args(parser.parse_args())
    """)
    result = subprocess.run([sys.executable, "-c", script, "-c", str(tmp_path / "nowhere")], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # The message is the last line: with the GPTQ extra installed, torchao logs at import that its CUDA kernels do not
    # load on a CPU build of torch, before the script has run.
    assert result.stderr.strip().splitlines()[-1].startswith("error: Checkpoint folder")


CHAT_SCRIPTS = ("cli_demo.py", "web_demo.py", "openai_api.py")


@pytest.mark.parametrize("name", CHAT_SCRIPTS)
def test_chat_scripts_default_to_the_released_chat_model_as_the_originals_did(name, capsys):
    """`python cli_demo.py` (web_demo.py, openai_api.py) without -c, as the original README runs them."""
    script = import_script(REPO / name)
    parse = script.parse_args if hasattr(script, "parse_args") else script.build_parser().parse_args
    with pytest.raises(SystemExit) as stopped:
        parse(["--help"])
    assert stopped.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.count("(default: Qwen/Qwen-7B-Chat)") == 1, help_text
    parsed = parse([])
    args = parsed[0] if isinstance(parsed, tuple) else parsed  # openai_api.py's also returns the server settings
    assert args.checkpoint_path == "Qwen/Qwen-7B-Chat"


def test_without_c_and_offline_the_demo_names_the_default_model_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hub-cache")}
    result = subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--query", "Hello"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: 'Qwen/Qwen-7B-Chat' is not a local folder, and it could not be fetched from the Hugging Face hub")

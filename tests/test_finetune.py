"""`finetune.py` as users run it, training a tiny checkpoint on CPU until chat() gives the trained answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUESTION, ANSWER = "Who are you?", "I am a tiny test model."
GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.json"
    sample = {"id": "who", "conversations": [{"from": "user", "value": QUESTION}, {"from": "assistant", "value": ANSWER}]}
    path.write_text(json.dumps([sample]))
    return path


def finetune(base: Path, data: Path, output: Path, *extra: str, device: str = "cpu") -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(base), "--data_path", str(data),
        "--output_dir", str(output), *(["--use_cpu"] if device == "cpu" else []), "--per_device_train_batch_size",
        "1", "--report_to", "none",
        "--lr_scheduler_type", "constant", "--logging_steps", "10", *extra,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_full_finetuning_writes_a_complete_folder_that_chats_the_trained_answer(tmp_path, tiny_chat_dir, data_file):
    from qwen.loading import load_model_and_tokenizer

    finetune(tiny_chat_dir, data_file, tmp_path / "full", "--max_steps", "60", "--learning_rate", "5e-3",
             "--save_strategy", "no")
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (tmp_path / "full" / name).is_file(), name
    assert (tmp_path / "full" / "generation_config.json").read_bytes() == \
        (tiny_chat_dir / "generation_config.json").read_bytes()
    model, tokenizer = load_model_and_tokenizer(tmp_path / "full", cpu_only=True)
    assert model.chat(tokenizer, QUESTION, history=None, **GREEDY)[0] == ANSWER


# Start-up lines of optional third-party packages (torchao, torch's pytree notices, bitsandbytes, DeepSpeed, gptqmodel)
# that `import qwen` silences; each command that imports them must show none.
THIRD_PARTY_NOISE = ("Failed to load", "_pytree", "gemm_4bit_forward", "publisher trust", "Setting accelerator to CPU",
                     "GPT-QModel", "GIL is enabled", "Auto setting")


def assert_no_third_party_noise(result: subprocess.CompletedProcess) -> None:
    for marker in THIRD_PARTY_NOISE:
        assert marker not in result.stderr and marker not in result.stdout, marker


def test_lora_adapter_reloads_with_peft_and_merges_to_the_same_model(tmp_path, tiny_chat_dir, data_file):
    import qwen  # noqa: F401  (registers the Qwen classes for AutoPeftModelForCausalLM)
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from qwen.loading import LoadError, load_model_and_tokenizer

    adapter = tmp_path / "lora"
    # A random tiny model's output layer is too weak for adapters alone to make one answer win; training it as a
    # module_to_save (as base-model LoRA does for wte and lm_head) lets 60 CPU steps memorize the answer.
    result = finetune(tiny_chat_dir, data_file, adapter, "--use_lora", "--max_steps", "60", "--learning_rate", "1e-2",
                      "--lora_r", "8", "--lora_dropout", "0", "--lora_modules_to_save", "lm_head",
                      "--save_strategy", "no")
    assert_no_third_party_noise(result)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # the adapter folder carries the tokenizer, as the original
    assert model.chat(tokenizer, QUESTION, history=None, **GREEDY)[0] == ANSWER
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters themselves were trained

    merged_dir = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "qwen.lora", "merge", str(adapter), str(merged_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_third_party_noise(result)  # peft imports bitsandbytes and gptqmodel here, accelerate DeepSpeed
    from qwen.lora import merge_adapter

    merged_weights = (merged_dir / "model.safetensors").read_bytes()
    with pytest.raises(LoadError, match=r"already holds a model \(config.json, model.safetensors\).*--overwrite"):
        merge_adapter(adapter, merged_dir)  # a second merge into the same folder must be asked for
    assert (merged_dir / "model.safetensors").read_bytes() == merged_weights
    merged, merged_tokenizer = load_model_and_tokenizer(merged_dir, cpu_only=True)
    assert merged.chat(merged_tokenizer, QUESTION, history=None, **GREEDY)[0] == ANSWER
    ids = torch.tensor([tokenizer.encode("Tell me about LoRA merging.")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen.lora", "merge", str(tmp_path), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "not a LoRA adapter folder" in result.stderr


def test_bad_training_data_stops_with_the_sample_named(tmp_path, tiny_chat_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "q7", "conversations": [{"from": "user", "value": "hi"}]}) + "\n")
    command = [sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(tiny_chat_dir),
               "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("error: sample 'q7' (#0) has no assistant turn, so there is nothing to learn from it.")


def test_qlora_on_an_nf4_load_trains_and_its_adapter_reloads(tmp_path, tiny_chat_dir, data_file):
    """Q-LoRA on a 16-bit checkpoint: bitsandbytes loads it in 4-bit NF4 (on CPU here) and LoRA trains on top."""
    pytest.importorskip("bitsandbytes")
    import qwen  # noqa: F401
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter = tmp_path / "qlora"
    finetune(tiny_chat_dir, data_file, adapter, "--use_lora", "--q_lora", "--gradient_checkpointing", "--max_steps",
             "60", "--learning_rate", "1e-2", "--lora_r", "8", "--lora_dropout", "0", "--lora_modules_to_save",
             "lm_head", "--save_strategy", "no")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] and set(config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    # The adapter was trained against 4-bit weights; on the full-precision base it still gives the answer.
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert model.chat(tokenizer, QUESTION, history=None, **GREEDY)[0] == ANSWER


def validated_deepspeed_config(config: dict) -> object:
    """Fill the "auto" values the way Trainer does for a 7B Qwen, then parse with DeepSpeed's own config class."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from qwen.checkpoint import config_for_size

    args = TrainingArguments(output_dir="unused", use_cpu=True, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, learning_rate=1e-4, bf16=True)
    filled = HfTrainerDeepSpeedConfig(config)
    filled.trainer_config_process(args)
    model = torch.nn.Module()
    model.config = config_for_size("7B")
    filled.trainer_config_finalize(args, model, num_training_steps=1000)
    return DeepSpeedConfig(filled.config)


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_parse(stage):
    config = json.loads((REPO / "finetune" / f"ds_config_zero{stage}.json").read_text())
    parsed = validated_deepspeed_config(config)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 8 and parsed.bfloat16_config.enabled
    # torch's AdamW: without torch_adam DeepSpeed builds its FusedAdam, JIT-compiled on first use (nvcc on a GPU
    # machine, which many training images lack; gcc for 90 s on the CPU).
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["torch_adam"] is True
    if stage == 3:  # full fine-tuning saves one consolidated 16-bit checkpoint, not shards per rank
        assert parsed.zero_config.gather_16bit_weights_on_model_save


def test_deepspeed_parser_rejects_a_broken_config():
    config = json.loads((REPO / "finetune" / "ds_config_zero2.json").read_text())
    config["zero_optimization"]["stage"] = 7
    with pytest.raises(Exception, match="stage"):
        validated_deepspeed_config(config)


@pytest.fixture(scope="module")
def two_samples_file(tmp_path_factory) -> Path:
    """Two different conversations, so that the order Trainer draws them in matters to the losses."""
    path = tmp_path_factory.mktemp("data2") / "data.jsonl"
    samples = [
        {"id": "who", "conversations": [{"from": "user", "value": QUESTION}, {"from": "assistant", "value": ANSWER}]},
        {"id": "sky", "system": "Answer in one word.",
         "conversations": [{"from": "user", "value": "What colour is the sky?"}, {"from": "assistant", "value": "Blue."}]},
    ]
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return path


def logged_losses(output: Path) -> list[float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resuming_from_a_saved_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, tiny_chat_dir,
                                                                             two_samples_file):
    common = ("--max_steps", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "3")
    whole = tmp_path / "whole"
    finetune(tiny_chat_dir, two_samples_file, whole, *common, "--save_strategy", "steps", "--save_steps", "2")
    assert (whole / "checkpoint-2" / "optimizer.pt").is_file()
    # As the original's (its Trainer held the tokenizer), a checkpoint folder loads and chats on its own.
    from qwen.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(whole / "checkpoint-2", cpu_only=True)
    assert isinstance(model.chat(tokenizer, QUESTION, history=None, max_new_tokens=2, **GREEDY)[0], str)
    assert (whole / "checkpoint-2" / "generation_config.json").read_bytes() == \
        (tiny_chat_dir / "generation_config.json").read_bytes()

    resumed = tmp_path / "resumed"
    finetune(tiny_chat_dir, two_samples_file, resumed, *common, "--save_strategy", "no",
             "--resume_from_checkpoint", str(whole / "checkpoint-2"))
    whole_losses, resumed_losses = logged_losses(whole), logged_losses(resumed)
    assert len(whole_losses) == 4 and len(resumed_losses) == 4  # the resumed log carries the first two steps over
    # Same data order (the sampler's position and RNG state are restored), same optimizer moments, same weights: on
    # one CPU thread layout the arithmetic repeats exactly, so the last steps and the final model match.
    assert resumed_losses[2:] == pytest.approx(whole_losses[2:], rel=1e-6)
    final, resumed_final = saved_weights(whole), saved_weights(resumed)
    assert final.keys() == resumed_final.keys()
    for name in final:
        torch.testing.assert_close(resumed_final[name], final[name], rtol=0, atol=1e-6, msg=name)
    start = saved_weights(tiny_chat_dir)
    assert any(not torch.equal(start[name], final[name]) for name in final)  # the steps after resuming did train


# Runs finetune.main in-process with the MLP's forward counted. Not the block's: transformers wraps a checkpointed
# layer's own forward when the class is created, so replacing QWenBlock.forward would switch checkpointing off.
COUNT_BLOCK_FORWARDS = """
import json, sys
import finetune
from qwen import modeling_qwen

calls = 0
original = modeling_qwen.QWenMLP.forward
def counted(self, *args, **kwargs):
    global calls
    calls += 1
    return original(self, *args, **kwargs)
modeling_qwen.QWenMLP.forward = counted
finetune.main(sys.argv[1:])
print(json.dumps({"mlp_forwards": calls}))
"""


@pytest.mark.parametrize("mode", [(), ("--use_lora", "--lora_r", "8")], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_each_block_and_trains_the_same(tmp_path, tiny_chat_dir, data_file, mode):
    from qwen.configuration_qwen import QWenConfig

    layers = QWenConfig.from_pretrained(tiny_chat_dir).num_hidden_layers
    steps = 2
    runs = {}
    for checkpointing in (False, True):
        output = tmp_path / f"checkpointing-{checkpointing}"
        command = [
            sys.executable, "-c", COUNT_BLOCK_FORWARDS, "--model_name_or_path", str(tiny_chat_dir),
            "--data_path", str(data_file), "--output_dir", str(output), "--use_cpu", "--report_to", "none",
            "--per_device_train_batch_size", "1", "--max_steps", str(steps), "--learning_rate", "1e-2",
            "--logging_steps", "1", "--save_strategy", "no", "--lora_dropout", "0",
            "--gradient_checkpointing", str(checkpointing), *mode,
        ]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-4000:]
        runs[checkpointing] = (json.loads(result.stdout.strip().splitlines()[-1])["mlp_forwards"],
                               logged_losses(output))
    (plain_calls, plain_losses), (checkpointed_calls, checkpointed_losses) = runs[False], runs[True]
    assert plain_calls == steps * layers
    assert checkpointed_calls == 2 * steps * layers  # every block ran again in the backward pass
    # Recomputing gives the same activations, so the same gradients: the second step's loss (after one update,
    # which only happens if gradients reached the trained weights through the checkpointed blocks) matches too.
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    assert checkpointed_losses[1] != pytest.approx(checkpointed_losses[0], rel=1e-3)


def test_lora_on_a_base_model_also_trains_the_embeddings_and_output_layer(tmp_path, tiny_base_dir, data_file):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    adapter = tmp_path / "base-lora"
    result = finetune(tiny_base_dir, data_file, adapter, "--use_lora", "--max_steps", "2", "--learning_rate", "1e-2",
                      "--lora_r", "8", "--save_steps", "2")
    # What it trains is printed, as the original printed it (peft's print_trainable_parameters).
    assert [line for line in result.stdout.splitlines() if line.startswith("trainable params: ")]
    # A checkpoint folder carries the tokenizer, as the original's did.
    assert AutoTokenizer.from_pretrained(adapter / "checkpoint-2").encode(QUESTION) == \
        AutoTokenizer.from_pretrained(tiny_base_dir).encode(QUESTION)
    # generation_config.json says chat_format "raw": a base model, which has never used <|im_start|> / <|im_end|>.
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "wte"]
    saved = load_file(adapter / "adapter_model.safetensors")
    base = saved_weights(tiny_base_dir)
    trained = {name: tensor for name, tensor in saved.items() if "lora_" not in name}
    assert {name.rsplit(".", 2)[-2] for name in trained} == {"wte", "lm_head"}, sorted(trained)
    for name, tensor in trained.items():
        base_name = "lm_head.weight" if "lm_head" in name else "transformer.wte.weight"
        assert tensor.shape == base[base_name].shape and not torch.equal(tensor, base[base_name]), name


def test_chat_model_lora_trains_only_the_adapters_by_default(tiny_chat_dir):
    from qwen.lora import LoraSettings, prepare_lora_model

    model = prepare_lora_model(tiny_chat_dir, LoraSettings(r=4), chat=True)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all("lora_A" in name or "lora_B" in name for name in trained)


def test_qlora_on_a_base_model_trains_only_the_adapters_by_default_as_the_original(tiny_base_dir):
    """The original's Q-LoRA never trained wte and lm_head in full, base model or not: they would take more memory
    than the 4-bit model."""
    pytest.importorskip("bitsandbytes")
    from qwen.lora import LoraSettings, prepare_lora_model

    model = prepare_lora_model(tiny_base_dir, LoraSettings(r=4, q_lora=True), chat=False)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all("lora_A" in name or "lora_B" in name for name in trained), sorted(trained)
    chosen = prepare_lora_model(tiny_base_dir, LoraSettings(r=4, q_lora=True, modules_to_save=["lm_head"]), chat=False)
    assert any("lm_head.modules_to_save" in name for name, p in chosen.named_parameters() if p.requires_grad)


def test_qlora_under_use_cpu_loads_its_4bit_weights_on_the_cpu(tiny_base_dir, monkeypatch):
    """bitsandbytes puts a 4-bit load on a visible GPU unless told otherwise, --use_cpu or not."""
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script

    training = script.parse_args(["--data_path", "d", "--output_dir", "out", "--use_cpu", "--q_lora"])[2]
    assert script.quantized_device_map(script.trains_on_cpu(training)) == {"": "cpu"}
    assert script.quantized_device_map(False) is None  # on a GPU: transformers' choice, the process's current GPU
    pytest.importorskip("bitsandbytes")
    from qwen.lora import LoraSettings, prepare_lora_model

    model = prepare_lora_model(tiny_base_dir, LoraSettings(r=4, q_lora=True), chat=False,
                               quantized_device_map={"": "cpu"})
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


def test_fp16_lora_keeps_what_trains_in_fp32_and_the_frozen_base_in_fp16(tiny_base_dir):
    """fp16 training needs a GPU, but the precision split is decided at load time and checked here."""
    from qwen.lora import LoraSettings, prepare_lora_model

    model = prepare_lora_model(tiny_base_dir, LoraSettings(r=4), dtype=torch.float16, chat=False)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.float16}


def test_bf16_full_finetuning_saves_bf16_weights_and_fp16_on_the_cpu_is_refused(tmp_path, tiny_chat_dir, data_file):
    finetune(tiny_chat_dir, data_file, tmp_path / "bf16", "--bf16", "True", "--max_steps", "2",
             "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no")
    assert {tensor.dtype for tensor in saved_weights(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert all(loss == loss for loss in logged_losses(tmp_path / "bf16"))  # no NaN

    command = [sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(tiny_chat_dir),
               "--data_path", str(data_file), "--output_dir", str(tmp_path / "fp16"), "--use_cpu", "--fp16", "True",
               "--report_to", "none"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: --fp16 needs a CUDA GPU; on the CPU train with "
                                                      "--bf16 True or in fp32 (neither flag).")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed-precision training runs only on a CUDA GPU")
def test_fp16_lora_and_full_finetuning_train_on_a_gpu(tmp_path, tiny_chat_dir, data_file):
    # The loss scaler skips a step whose fp16 gradients overflow (and halves its scale): a few at the start are
    # normal, but a run whose every step was skipped logs finite losses that never move. On the CPU in fp32 these
    # settings lowered the loss by 0.2 (LoRA) and 0.9 (full) in 16 steps.
    for name, mode in (("lora", ("--use_lora", "--lora_r", "8")), ("full", ())):
        finetune(tiny_chat_dir, data_file, tmp_path / name, "--fp16", "True", "--max_steps", "16",
                 "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", *mode, device="cuda")
        losses = logged_losses(tmp_path / name)
        assert len(losses) == 16 and all(loss == loss for loss in losses)  # no fp16 overflow reached the loss
        assert losses[-1] < losses[0] - 0.05, f"{name}: fp16 training hardly moved the loss: {losses}"


# --------------------------------------------------------------------------------------------------------------------
# Refusals and reports before training starts
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def finetune_main(monkeypatch):
    """finetune.main in this process, for runs that must stop before the model is loaded: the SystemExit's message
    is the line the user sees."""
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script

    def run(base: Path, data: Path, output: Path, *extra: str) -> str:
        with pytest.raises(SystemExit) as stop:
            script.main(["--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(output),
                         "--use_cpu", "--report_to", "none", *extra])
        return str(stop.value.code)

    return run


def test_data_that_is_not_utf8_stops_with_an_error_line(tmp_path, tiny_chat_dir, finetune_main):
    data = tmp_path / "latin1.jsonl"
    sample = {"id": "fr", "conversations": [{"from": "user", "value": "Où?"}, {"from": "assistant", "value": "Là."}]}
    raw = b"\n" + json.dumps(sample, ensure_ascii=False).encode("latin-1") + b"\n"
    data.write_bytes(raw)
    assert finetune_main(tiny_chat_dir, data, tmp_path / "out") == (
        f"error: {data}, line 2: not UTF-8 text (byte 0xf9 at offset {raw.index(0xF9)}); save the file as UTF-8."
    )


def test_a_run_where_every_sample_is_cut_to_no_label_refuses_to_start(tmp_path, tiny_chat_dir, data_file,
                                                                       finetune_main, tokenizer):
    from qwen.sft import first_label_position, load_samples

    first = first_label_position(tokenizer, load_samples(data_file)[0])  # the system turn's <|im_end|>
    message = finetune_main(tiny_chat_dir, data_file, tmp_path / "out", "--model_max_length", str(first))
    assert message == (
        f"error: --data_path {data_file}: every sample's first label is beyond --model_max_length {first} (the "
        f"earliest at token {first}), so nothing is left to learn from; raise --model_max_length above {first}."
    )
    assert not (tmp_path / "out").exists()


LONG_PROMPT = {"id": "long", "conversations": [{"from": "user", "value": "word " * 100},
                                               {"from": "assistant", "value": "ok"}]}


def long_prompt_tokens(tokenizer) -> tuple[int, int]:
    """(length, first labelled position) of LONG_PROMPT under the assistant-only mask: its reply starts beyond 64
    tokens. (Under the original mask its system turn's markers are labelled, and it is never left out at 64.)"""
    from qwen.sft import IGNORE_INDEX, tokenize_sample

    labels = tokenize_sample(tokenizer, LONG_PROMPT, label_mask="assistant_only").labels
    first = next(position for position, label in enumerate(labels) if label != IGNORE_INDEX)
    assert 64 < first < len(labels)
    return len(labels), first


def test_samples_cut_to_no_label_are_reported_one_line_each_up_to_a_cap(monkeypatch, capsys, tokenizer):
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script

    long_prompt = LONG_PROMPT
    length, first = long_prompt_tokens(tokenizer)
    short = {"id": "short", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}]}
    samples = [long_prompt] * 13 + [short]
    dataset = script.conversation_dataset(samples, tokenizer, "--data_path", "data.json", 64, lazy=True, report=True,
                                          label_mask="assistant_only")
    assert len(dataset) == 1 and dataset[0] == script.ConversationDataset([short], tokenizer, 64,
                                                                          label_mask="assistant_only")[0]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == script.LEFT_OUT_LINES + 1
    assert lines[0] == (f"warning: data.json: sample 'long' (#0) is {length} tokens long and its first label is at "
                        f"token {first}, beyond --model_max_length 64: every label is cut off, so it is left out.")
    assert lines[9].startswith(f"warning: data.json: sample 'long' (#9) is {length} tokens long")
    assert lines[-1] == "warning: data.json: 3 more samples like these are left out (13 of 14 in all)."


def test_a_sample_cut_to_no_label_is_reported_and_left_out_of_the_steps(tmp_path, tiny_chat_dir, tokenizer):
    """On its own in a step, a sample without any label gives a loss of 0 and no gradient: a wasted step that still
    moves the weights (momentum, weight decay) and drags the logged loss down."""
    data = tmp_path / "data.jsonl"
    samples = [
        {"id": "who", "conversations": [{"from": "user", "value": QUESTION}, {"from": "assistant", "value": ANSWER}]},
        LONG_PROMPT,
    ]
    data.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    result = finetune(tiny_chat_dir, data, tmp_path / "out", "--model_max_length", "64", "--max_steps", "2",
                      "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
                      "--label_mask", "assistant_only")
    length, first = long_prompt_tokens(tokenizer)
    reports = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert reports == [f"warning: {data}: sample 'long' (#1) is {length} tokens long and its first label is at "
                       f"token {first}, beyond --model_max_length 64: every label is cut off, so it is left out."]
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 2 and all(loss > 1 for loss in losses)  # both steps trained on the labelled sample


@pytest.mark.parametrize("saved", ["config.json", "model.safetensors", "adapter_config.json"])
def test_an_output_dir_holding_a_model_is_not_overwritten_unless_asked(tmp_path, tiny_chat_dir, data_file,
                                                                       finetune_main, saved):
    import finetune as script

    output = tmp_path / "out"
    output.mkdir()
    (output / saved).write_text("{}")
    message = finetune_main(tiny_chat_dir, data_file, output)
    assert message == (f"error: --output_dir {output} already holds a model ({saved}). Choose another folder, or "
                       "pass --overwrite_output_dir True to replace it.")
    assert (output / saved).read_text() == "{}"

    def args(*extra: str) -> script.TrainingArguments:
        return script.parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(output),
                                  "--use_cpu", *extra])[2]

    script.check_output_dir(args("--overwrite_output_dir", "True"))  # asked: goes ahead
    resumable = tmp_path / "resumable"
    (resumable / "checkpoint-2").mkdir(parents=True)
    (resumable / "checkpoint-2" / "config.json").write_text("{}")  # Trainer's own checkpoint: resuming works
    script.check_output_dir(script.parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir",
                                               str(resumable), "--use_cpu"])[2])


LAUNCHER_DEFAULT_MODELS = {
    "finetune_ds.sh": "Qwen/Qwen-7B",
    "finetune_lora_ds.sh": "Qwen/Qwen-7B",
    "finetune_lora_single_gpu.sh": "Qwen/Qwen-7B",
    "finetune_qlora_ds.sh": "Qwen/Qwen-7B-Chat-Int4",
    "finetune_qlora_single_gpu.sh": "Qwen/Qwen-7B-Chat-Int4",
}


def launcher_env(**extra: str) -> dict[str, str]:
    # The launchers call `python` (and `torchrun`) from PATH: make them this interpreter's.
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **extra}


@pytest.mark.parametrize("launcher", sorted(LAUNCHER_DEFAULT_MODELS))
def test_each_launcher_prints_its_usage_under_sh(launcher):
    """The original README starts the launchers with `sh` (dash on Debian and Ubuntu), not only with bash."""
    result = subprocess.run(["sh", f"finetune/{launcher}", "-h"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"usage: sh finetune/{launcher} [-m MODEL] -d DATA")
    assert f"(default: {LAUNCHER_DEFAULT_MODELS[launcher]})" in result.stdout
    config = "ds_config_zero3.json" if launcher == "finetune_ds.sh" else "ds_config_zero2.json"
    assert f"(default: {f'finetune/{config}' if '_ds' in launcher else 'none'})" in result.stdout


def test_a_launcher_refuses_a_bad_command_line_in_one_line():
    result = subprocess.run(["sh", "finetune/finetune_lora_ds.sh", "-m", "Qwen-7B", "--num_train_epochs", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("finetune/finetune_lora_ds.sh: unknown option --num_train_epochs (finetune.py's own "
                             "flags go after --); -h lists the options\n")
    result = subprocess.run(["sh", "finetune/finetune_lora_ds.sh", "-m"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "finetune/finetune_lora_ds.sh: -m needs a value; -h lists the options"]


def test_the_qlora_launcher_defaults_to_the_int4_chat_model_as_the_original(tmp_path, two_samples_file):
    """Without -m, the Q-LoRA launchers train Qwen/Qwen-7B-Chat-Int4; offline and with an empty hub cache, the run
    stops with one line naming it."""
    env = launcher_env(CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(["sh", str(REPO / "finetune" / "finetune_qlora_single_gpu.sh"), "-d",
                             str(two_samples_file), "-o", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: 'Qwen/Qwen-7B-Chat-Int4' is not a local folder, and it could not be fetched from the Hugging Face hub")


def test_a_gpu_launcher_started_with_sh_trains_on_the_cpu_in_bf16_when_there_is_no_gpu(tmp_path, tiny_chat_dir,
                                                                                        two_samples_file):
    """`sh finetune/X.sh` as the original README runs it (/bin/sh is dash here, without bash's arrays or pipefail).
    The launchers pass --bf16 True, which transformers refuses without a GPU unless --use_cpu is set. The output
    folder's name has a space, which the launcher must pass on as one argument."""
    output = tmp_path / "lora out"
    result = subprocess.run(
        ["sh", str(REPO / "finetune" / "finetune_lora_single_gpu.sh"), "-m", str(tiny_chat_dir), "-d",
         str(two_samples_file), "-o", str(output), "--", "--max_steps", "1", "--lora_r", "8", "--save_strategy", "no"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=launcher_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert "No GPU found: training on the CPU (as with --use_cpu True)." in result.stderr.splitlines()
    assert (output / "adapter_config.json").is_file()
    losses = logged_losses(output)
    assert len(losses) == 1 and losses[0] == losses[0]


def test_every_flag_of_the_original_script_is_accepted_with_its_meaning(monkeypatch):
    """The fields of the original finetune.py's argument classes and the flags its launch scripts pass, spelled as
    there; the ones transformers has since renamed land on the new names."""
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script

    model, data, training, lora = script.parse_args([
        "--data_path", "train.json", "--eval_data_path", "eval.json", "--lazy_preprocess", "True",
        "--output_dir", "out", "--use_cpu", "--cache_dir", "hub-cache", "--optim", "adamw_torch",
        "--model_max_length", "512", "--use_lora", "True", "--lora_r", "8", "--lora_alpha", "32",
        "--lora_dropout", "0.1", "--lora_target_modules", "c_attn", "w2", "--lora_weight_path", "adapter",
        "--lora_bias", "all", "--q_lora", "False",
        "--bf16", "True", "--num_train_epochs", "3", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "steps",
        "--save_strategy", "steps", "--save_steps", "1000", "--save_total_limit", "10", "--learning_rate", "3e-4",
        "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--report_to", "none", "--gradient_checkpointing", "True",
    ])
    assert model.model_name_or_path == "Qwen/Qwen-7B"  # the original's default
    assert (data.data_path, data.eval_data_path, data.lazy_preprocess) == ("train.json", "eval.json", True)
    assert data.label_mask == "original"
    assert (training.cache_dir, training.optim, training.model_max_length, training.use_lora) == (
        "hub-cache", "adamw_torch", 512, True)
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules, lora.lora_weight_path,
            lora.lora_bias, lora.q_lora) == (8, 32, 0.1, ["c_attn", "w2"], "adapter", "all", False)
    assert (training.eval_strategy, training.warmup_steps) == ("steps", 0.01)
    assert (training.num_train_epochs, training.gradient_accumulation_steps, training.save_total_limit,
            training.adam_beta2, training.lr_scheduler_type, training.gradient_checkpointing) == (
        3, 8, 10, 0.95, "cosine", True)

    def parse(*extra: str):
        return script.parse_args(["--data_path", "d", "--output_dir", "out", "--use_cpu", *extra])

    assert parse("--label_mask", "assistant_only")[1].label_mask == "assistant_only"
    assert parse("--evaluation_strategy", "epoch", "--eval_strategy", "epoch")[2].eval_strategy == "epoch"
    with pytest.raises(script.UsageError, match="Give --evaluation_strategy or --eval_strategy, not both."):
        parse("--evaluation_strategy", "steps", "--eval_strategy", "epoch")


def test_the_optimizer_is_the_original_scripts_adamw_torch_unless_another_is_chosen(monkeypatch):
    """The original set optim="adamw_torch"; transformers 5's own default is the fused AdamW."""
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script
    from transformers import Trainer

    def optimizer(*extra: str) -> tuple[type, dict]:
        training = script.parse_args(["--data_path", "d", "--output_dir", "out", "--use_cpu", *extra])[2]
        return Trainer.get_optimizer_cls_and_kwargs(training)

    cls, kwargs = optimizer()
    assert cls is torch.optim.AdamW and "fused" not in kwargs
    assert optimizer("--optim", "adamw_torch_fused") == (torch.optim.AdamW, {**kwargs, "fused": True})
    assert optimizer("--optim", "sgd")[0] is torch.optim.SGD


def test_samples_opening_with_an_assistant_turn_are_counted_in_one_note(monkeypatch, capsys, tokenizer):
    monkeypatch.syspath_prepend(str(REPO))
    import finetune as script

    greeting = {"conversations": [{"from": "assistant", "value": "Hello!"}, {"from": "user", "value": QUESTION},
                                  {"from": "assistant", "value": ANSWER}]}
    plain = {"conversations": greeting["conversations"][1:]}
    dataset = script.conversation_dataset([greeting, plain, greeting], tokenizer, "--data_path", "data.json", 512,
                                          lazy=False, report=True)
    assert dataset[0] == dataset[1] == dataset[2]  # the greeting is not trained on
    assert capsys.readouterr().err.strip().splitlines() == [
        "note: data.json: 2 of 3 samples open with an assistant turn; as in the original finetune.py, that turn is "
        "left out and training starts at the turn after it."]
    script.conversation_dataset([plain], tokenizer, "--data_path", "data.json", 512, lazy=False, report=True)
    assert capsys.readouterr().err == ""


# finetune.main once for each command line of a JSON list (argv[1]), in one process: the error line of each run.
RUN_EACH = """
import json, sys
import finetune

for argv in json.loads(sys.argv[1]):
    try:
        finetune.main(argv)
    except SystemExit as stop:
        print(stop.code)
"""


def test_a_hub_id_is_found_in_cache_dir_as_the_original_scripts_cache_dir_said(tmp_path, tiny_chat_dir):
    """--cache_dir is where hub downloads are kept (the original passed it to from_pretrained). Offline, a hub id
    resolves to its snapshot there, in the hub's cache layout, and not without the flag."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hub-cache" / "models--Qwen--Qwen-7B-Chat"
    shutil.copytree(tiny_chat_dir, repo_cache / "snapshots" / revision)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(revision)
    missing = tmp_path / "missing.json"
    common = ["--model_name_or_path", "Qwen/Qwen-7B-Chat", "--data_path", str(missing), "--output_dir",
              str(tmp_path / "out"), "--use_cpu"]
    runs = [common + ["--cache_dir", str(tmp_path / "hub-cache")], common,
            common + ["--cache_dir", str(tmp_path / "empty-cache")]]
    result = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(runs)], cwd=REPO, capture_output=True, text=True, timeout=600,
        # The default cache is an empty folder, so that a real download there cannot make the second run pass.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "default-cache")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found, without, elsewhere = result.stdout.strip().splitlines()[-3:]
    # The checkpoint was found and its tokenizer loaded: the run went on to read the data.
    assert found == f"error: Data file {str(missing)!r} does not exist."
    assert without.startswith("error: 'Qwen/Qwen-7B-Chat' is not a local folder, and it could not be fetched from "
                              "the Hugging Face hub ("), without
    assert elsewhere.startswith("error: 'Qwen/Qwen-7B-Chat' is not a local folder, and it could not be fetched from "
                                f"the Hugging Face hub into --cache_dir {tmp_path / 'empty-cache'} ("), elsewhere

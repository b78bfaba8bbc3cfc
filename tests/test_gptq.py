"""GPTQ Int4: run_gptq.py as users run it, loading its output and a hand-built copy of the released -Int4 layout by
every route (our class, AutoModelForCausalLM, trust_remote_code, the scripts' loader), Q-LoRA on top, and bad inputs.

Loading and quantizing need optimum and gptqmodel (pip install -e .[quant]); those tests skip without them. The
folder checks and the errors for a missing GPTQ stack run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen import QWenConfig, QWenLMHeadModel
from qwen.checkpoint import install_code

REPO = Path(__file__).resolve().parents[1]
QUESTION, ANSWER = "Who are you?", "I am a tiny test model."
GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None)
PROMPT_IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 9707, 11, 1879, 0]])
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@pytest.fixture(scope="module")
def gptq_stack(scratch_env) -> None:
    pytest.importorskip("optimum", reason="loading GPTQ checkpoints needs optimum (pip install -e .[quant])")
    pytest.importorskip("gptqmodel", reason="loading GPTQ checkpoints needs gptqmodel (pip install -e .[quant])")


@pytest.fixture(scope="module")
def scratch_env(tmp_path_factory) -> dict[str, str]:
    """gptqmodel and its helpers write caches and temporary files under HF_HOME, TMPDIR and an extensions folder:
    keep them in the test's own folder, in this process and in the scripts it starts."""
    root = tmp_path_factory.mktemp("gptq-env")
    env = {"HF_HOME": str(root / "hf"), "TMPDIR": str(root / "tmp"), "HF_HUB_OFFLINE": "1",
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(root / "ext"), "HF_MODULES_CACHE": str(root / "modules")}
    Path(env["TMPDIR"]).mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
        yield {**os.environ, **env}


# --------------------------------------------------------------------------------------------------------------------
# GPTQ v1 packing, written here independently of qwen/gptq.py: code j of an int32 word sits at bit j * bits
# --------------------------------------------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Non-negative codes -> int32 words, `32 // bits` consecutive codes along `dim` per word."""
    per_word = 32 // bits
    codes = codes.to(torch.int64).movedim(dim, 0)
    grouped = codes.reshape(codes.shape[0] // per_word, per_word, *codes.shape[1:])
    words = torch.zeros_like(grouped[:, 0])
    for j in range(per_word):
        words |= grouped[:, j] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, read as int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per_word = 32 // bits
    words = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    codes = torch.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)], dim=1)
    return codes.reshape(-1, *words.shape[1:]).movedim(0, dim)


def dequantize_v1(tensors: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    """W (out, in) in fp32 from a v1 layer: W[:, i] = (q[i] - (z[g_idx[i]] + 1)) * scales[g_idx[i]]."""
    q = unpack(tensors[f"{prefix}.qweight"], bits, dim=0)  # (in, out)
    z = unpack(tensors[f"{prefix}.qzeros"], bits, dim=1)  # (groups, out)
    g_idx = tensors[f"{prefix}.g_idx"].long()
    scales = tensors[f"{prefix}.scales"].float()
    return ((q - (z[g_idx] + 1)).float() * scales[g_idx]).T


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS.to(model.device), use_cache=False).logits.float().cpu()


# --------------------------------------------------------------------------------------------------------------------
# A checkpoint in the exact released -Int4 naming, built here with torch and safetensors
# --------------------------------------------------------------------------------------------------------------------

# Wide enough for the released group size of 128 (two groups in mlp.c_proj); the real vocabulary, so chat() runs.
HAND_BUILT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32, intermediate_size=512,
                  vocab_size=151936, seq_length=256, max_position_embeddings=1024)


def write_released_layout(folder: Path, vocab_file: Path, released_dir: Path, seed: int = 0) -> Path:
    """Random sym 4-bit codes, fp16 scales, g_idx, and an fp16 bias on all four linears (zero where Qwen has none),
    next to the released Qwen-VL-Chat-Int4 quantization_config and quantize_config.json, unchanged."""
    from qwen.checkpoint import AUTO_MAP_CONFIG, CHAT_GENERATION_CONFIG

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    config = QWenConfig(**HAND_BUILT)
    hidden, projection, ff_dim = config.hidden_size, config.kv_channels * config.num_attention_heads, 256
    shapes = {"attn.c_attn": (hidden, 3 * projection), "attn.c_proj": (projection, hidden),
              "mlp.w1": (hidden, ff_dim), "mlp.w2": (hidden, ff_dim), "mlp.c_proj": (ff_dim, hidden)}
    tensors = {
        "transformer.wte.weight": torch.randn(config.vocab_size, hidden, generator=generator) * 0.5,
        "lm_head.weight": torch.randn(config.vocab_size, hidden, generator=generator) * 0.1,
        "transformer.ln_f.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
    }
    for layer in range(config.num_hidden_layers):
        for norm in ("ln_1", "ln_2"):
            tensors[f"transformer.h.{layer}.{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
        for name, (in_features, out_features) in shapes.items():
            prefix = f"transformer.h.{layer}.{name}"
            groups = in_features // 128
            tensors[f"{prefix}.qweight"] = pack(torch.randint(0, 16, (in_features, out_features), generator=generator),
                                                4, dim=0)
            tensors[f"{prefix}.qzeros"] = pack(torch.full((groups, out_features), 8 - 1), 4, dim=1)  # sym, v1
            tensors[f"{prefix}.scales"] = 0.02 + 0.02 * torch.rand(groups, out_features, generator=generator)
            tensors[f"{prefix}.g_idx"] = torch.arange(in_features, dtype=torch.int32) // 128
            tensors[f"{prefix}.bias"] = (0.5 * torch.randn(out_features, generator=generator) if name == "attn.c_attn"
                                         else torch.zeros(out_features))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    released = json.loads((released_dir / "Qwen-VL-Chat-Int4" / "config.json").read_text())
    data = {**{k: v for k, v in config.to_dict().items() if k in HAND_BUILT or k in ("no_bias", "model_type")},
            "architectures": ["QWenLMHeadModel"], "auto_map": AUTO_MAP_CONFIG, "fp16": True, "bf16": False,
            "fp32": False, "torch_dtype": "float16", "quantization_config": released["quantization_config"]}
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    shutil.copyfile(released_dir / "Qwen-VL-Chat-Int4" / "quantize_config.json", folder / "quantize_config.json")
    (folder / "generation_config.json").write_text(json.dumps(CHAT_GENERATION_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    shutil.copyfile(vocab_file, folder / "qwen.tiktoken")
    return folder


@pytest.fixture(scope="module")
def hand_built_dir(tmp_path_factory, vocab_file, released_dir) -> Path:
    return write_released_layout(tmp_path_factory.mktemp("hand-built") / "Int4", vocab_file, released_dir)


def float_twin(folder: Path) -> QWenLMHeadModel:
    """The fp32 model whose linear weights are the folder's dequantized ones (the biases Qwen has kept)."""
    tensors = folder_tensors(folder)
    model = QWenLMHeadModel(QWenConfig.from_pretrained(folder)).float().eval()  # a plain model: nothing quantized
    state = {}
    for name in model.state_dict():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{prefix}.qweight" in tensors:
            state[name] = dequantize_v1(tensors, prefix, bits=4)
        else:
            state[name] = tensors[name].float()
    model.load_state_dict(state)
    return model


def with_changes(source: Path, target: Path, config: dict | None = None, quantize_config: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of `source` with fields of quantization_config / quantize_config.json or some tensors replaced."""
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        data["quantization_config"].update(config)
        (target / "config.json").write_text(json.dumps(data))
    if quantize_config is not None:
        data = json.loads((target / "quantize_config.json").read_text())
        data.update(quantize_config)
        (target / "quantize_config.json").write_text(json.dumps(data))
    if tensors is not None:
        everything = {**load_file(target / "model.safetensors"), **tensors}
        save_file(everything, target / "model.safetensors", metadata={"format": "pt"})
    return target


def as_v2(source: Path, target: Path, label: str) -> Path:
    """The same model in gptq_v2 (zero points stored without v1's minus one), labelled `label`."""
    tensors = {name: pack(unpack(t, 4, dim=1) + 1, 4, dim=1)
               for name, t in load_file(source / "model.safetensors").items() if name.endswith(".qzeros")}
    return with_changes(source, target, config={"checkpoint_format": label},
                        quantize_config={"checkpoint_format": label}, tensors=tensors)


# --------------------------------------------------------------------------------------------------------------------
# Folder checks (no GPTQ packages needed)
# --------------------------------------------------------------------------------------------------------------------


def test_hand_built_folder_has_the_released_int4_names(hand_built_dir, released_dir):
    released = json.loads((released_dir / "Qwen-VL-Chat-Int4" / "model.safetensors.index.json").read_text())
    released_layer = sorted(k.removeprefix("transformer.h.0.") for k in released["weight_map"]
                            if k.startswith("transformer.h.0."))
    ours = sorted(k.removeprefix("transformer.h.0.") for k in load_file(hand_built_dir / "model.safetensors")
                  if k.startswith("transformer.h.0."))
    assert ours == released_layer
    assert {"attn.c_attn.bias", "attn.c_proj.bias", "mlp.w1.bias", "mlp.w2.bias", "mlp.c_proj.bias"} <= set(ours)


def test_check_accepts_the_released_layout(hand_built_dir):
    from qwen.gptq import GPTQSettings, check_gptq_checkpoint

    assert check_gptq_checkpoint(hand_built_dir) == GPTQSettings(bits=4, group_size=128, desc_act=False, sym=True,
                                                                 checkpoint_format="gptq")


@pytest.mark.parametrize("case, message", [
    ("no_quantization_config", "has no quantization_config.*quantize_config.json has the settings"),
    ("no_settings_anywhere", "has no quantization_config.*settings .* are lost"),
    ("bits_8", "bits=8, group_size=128, but .*packed with 4 bits"),
    ("bits_5", "bits=5; GPTQ checkpoints use one of"),
    ("group_size_64", r"scales has shape \(1, 384\), not \(2, 384\) \(the weights use group_size 128\)"),
    ("files_disagree", "quantize_config.json says bits=8 but config.json's quantization_config says 4"),
    ("v2_labelled_v1", "checkpoint_format='gptq'.*those of 'gptq_v2'.*Set \"checkpoint_format\": \"gptq_v2\""),
    ("v1_labelled_v2", "checkpoint_format='gptq_v2'.*those of 'gptq'"),
    ("bias_not_zero", "mlp.w1.bias is not zero, but Qwen's mlp.w1 has no bias"),
    ("float_weights", "holds unquantized weights"),
])
def test_bad_folders_get_a_clear_error(tmp_path, hand_built_dir, case, message):
    from qwen.gptq import QuantizationError, check_gptq_checkpoint
    from qwen.loading import load_model_and_tokenizer

    folder = tmp_path / case
    if case in ("no_quantization_config", "no_settings_anywhere"):
        shutil.copytree(hand_built_dir, folder)
        data = json.loads((folder / "config.json").read_text())
        del data["quantization_config"]
        (folder / "config.json").write_text(json.dumps(data))
        if case == "no_settings_anywhere":
            (folder / "quantize_config.json").unlink()
    elif case == "bits_8":
        with_changes(hand_built_dir, folder, config={"bits": 8}, quantize_config={"bits": 8})
    elif case == "bits_5":
        with_changes(hand_built_dir, folder, config={"bits": 5}, quantize_config={"bits": 5})
    elif case == "group_size_64":
        with_changes(hand_built_dir, folder, config={"group_size": 64}, quantize_config={"group_size": 64})
    elif case == "files_disagree":
        with_changes(hand_built_dir, folder, quantize_config={"bits": 8})
    elif case == "v2_labelled_v1":
        as_v2(hand_built_dir, folder, label="gptq")
    elif case == "v1_labelled_v2":
        with_changes(hand_built_dir, folder, config={"checkpoint_format": "gptq_v2"})
    elif case == "bias_not_zero":
        with_changes(hand_built_dir, folder, tensors={"transformer.h.1.mlp.w1.bias": torch.ones(256).half()})
    elif case == "float_weights":
        with_changes(hand_built_dir, folder, tensors={"transformer.h.0.mlp.w2.weight": torch.zeros(256, 128).half()})
    with pytest.raises(QuantizationError, match=message):
        check_gptq_checkpoint(folder)
    # The scripts' loader checks before it loads anything, with or without the GPTQ packages installed.
    with pytest.raises(QuantizationError, match=message):
        load_model_and_tokenizer(folder, cpu_only=True)


def test_check_command_reports_a_folder(hand_built_dir, tmp_path, capsys):
    from qwen.gptq import main

    main(["check", str(hand_built_dir)])
    assert "GPTQ 4-bit, group size 128, symmetric, checkpoint_format gptq: OK" in capsys.readouterr().out
    bad = as_v2(hand_built_dir, tmp_path / "mislabelled", label="gptq")
    with pytest.raises(SystemExit, match=r"^error: .*Set \"checkpoint_format\": \"gptq_v2\""):
        main(["check", str(bad)])


# A Python without the GPTQ stack, made from this one: `sys.modules[name] = None` makes `import name` fail and
# `importlib.util.find_spec(name)` (what transformers and our checks ask) return None, exactly as for a package that
# is not installed. Set before anything is imported, in every process the test starts.
HIDE_PACKAGES = "import sys; sys.modules.update(dict.fromkeys({hidden!r}))\n"

MISSING_STACK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import qwen
    assert Path(qwen.__file__).is_relative_to(sys.argv[1]), qwen.__file__
    from transformers import AutoModelForCausalLM
    from qwen import QWenLMHeadModel
    from qwen.loading import load_model_and_tokenizer
    for load in (lambda: QWenLMHeadModel.from_pretrained(sys.argv[2], device_map="auto"),
                 lambda: AutoModelForCausalLM.from_pretrained(sys.argv[2], device_map="auto"),
                 lambda: AutoModelForCausalLM.from_pretrained(sys.argv[3], device_map="auto", trust_remote_code=True),
                 lambda: load_model_and_tokenizer(sys.argv[2])):
        try:
            load()
        except Exception as error:
            print(type(error).__name__, "|", error)
        else:
            print("LOADED")
""")

RUN_GPTQ_SCRIPT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"


# ("gptqmodel",): optimum alone, where transformers itself fails with "NameError: QuantizeConfig" (../TESTING.md).
@pytest.mark.parametrize("hidden", [("optimum", "gptqmodel"), ("gptqmodel",)], ids=["neither", "optimum-only"])
def test_a_missing_gptq_stack_is_one_clear_error_by_every_route(tmp_path, hand_built_dir, tiny_chat_dir, hidden):
    remote = tmp_path / "remote"
    shutil.copytree(hand_built_dir, remote)
    install_code(remote)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    hide = HIDE_PACKAGES.format(hidden=hidden)
    result = subprocess.run([sys.executable, "-c", hide + MISSING_STACK_SCRIPT, str(REPO), str(hand_built_dir),
                             str(remote)], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4, result.stdout
    torch_version = torch.__version__.split("+")[0]
    missing = f"{' and '.join(hidden)} {'is' if len(hidden) == 1 else 'are'} not installed"
    for line in lines:
        assert "needs optimum and gptqmodel" in line and missing in line, line
        assert f"pip install torch=={torch_version} optimum gptqmodel" in line, line
    assert [line.split(" |")[0] for line in lines] == ["ImportError"] * 3 + ["QuantizationError"]

    # run_gptq.py says the same, before reading anything large.
    data = tmp_path / "calibration.json"
    data.write_text(json.dumps([{"conversations": [{"from": "user", "value": "hi"},
                                                   {"from": "assistant", "value": "hello"}]}]))
    result = subprocess.run([sys.executable, "-c", hide + RUN_GPTQ_SCRIPT, "run_gptq.py", "--model_name_or_path",
                             str(tiny_chat_dir), "--data_path", str(data), "--out_path", str(tmp_path / "out"),
                             "--group-size", "32"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and missing in last_line and "pip install -e .[quant]" in last_line
    assert not (tmp_path / "out").exists()


def run_gptq_script():
    spec = importlib.util.spec_from_file_location("run_gptq", REPO / "run_gptq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_gptq_refuses_what_it_cannot_do(tmp_path, hand_built_dir, tiny_chat_dir, capsys):
    from qwen.gptq import QuantizationError, quantize_checkpoint

    data = tmp_path / "calibration.json"
    data.write_text("[]")
    with pytest.raises(QuantizationError, match="--bits 3 is not supported; use 4"):
        quantize_checkpoint(tiny_chat_dir, data, tmp_path / "out", bits=3)
    with pytest.raises(QuantizationError, match="--group-size 100: use a positive multiple of 8"):
        quantize_checkpoint(tiny_chat_dir, data, tmp_path / "out", group_size=100)
    with pytest.raises(QuantizationError, match="already GPTQ-quantized"):
        quantize_checkpoint(hand_built_dir, data, tmp_path / "out")
    # The tiny model's layers have 32 or 64 inputs: groups of 128 or 64 would leave partial ones, which no kernel
    # runs (the first forward would fail).
    with pytest.raises(QuantizationError, match=r"--group-size 128 does not divide .*attn.c_attn has 32, .*"
                                                r"mlp.c_proj has 64.*Use --group-size 32\."):
        quantize_checkpoint(tiny_chat_dir, data, tmp_path / "out", group_size=128)
    with pytest.raises(QuantizationError, match=r"--group-size 64 does not divide .*Use --group-size 32\."):
        quantize_checkpoint(tiny_chat_dir, data, tmp_path / "out", group_size=64)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(QuantizationError, match="is not empty"):
        quantize_checkpoint(tiny_chat_dir, data, tmp_path / "full", group_size=32)
    with pytest.raises(SystemExit) as exit_code:
        run_gptq_script().main(["--model_name_or_path", str(tiny_chat_dir), "--data_path", str(data), "--out_path",
                                str(tmp_path / "o"), "--bits", "3"])
    assert exit_code.value.code == 2 and "--bits: invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# run_gptq.py and loading (optimum + gptqmodel)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    """A few conversations in the fine-tuning format, like the data a user calibrates with."""
    topics = ["the weather", "cooking rice", "prime numbers", "a trip to Paris", "learning Python", "tea", "chess",
              "the moon", "writing letters", "bicycles", "gardening", "music theory"]
    samples = [{"id": f"c{i}", "conversations": [
        {"from": "user", "value": f"Tell me something about {topic}."},
        {"from": "assistant", "value": f"Here is something about {topic}: it is a subject many people enjoy, "
                                       f"and there is always more to learn about {topic}."}]}
               for i, topic in enumerate(topics)]
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    path.write_text(json.dumps(samples))
    return path


def run_gptq(tmp_path_factory, source: Path, calibration_file: Path, env: dict[str, str], bits: int) -> Path:
    """run_gptq.py on `source`, run from a folder of its own (where nothing may be left behind).

    --group-size 32: the tiny model's layers have 32 or 64 inputs, fewer than the released 128.
    """
    work = tmp_path_factory.mktemp("run-gptq-cwd")
    out = tmp_path_factory.mktemp(f"int{bits}") / f"tiny-Int{bits}"
    command = [sys.executable, str(REPO / "run_gptq.py"), "--model_name_or_path", str(source),
               "--data_path", str(calibration_file), "--out_path", str(out), "--bits", str(bits), "--group-size", "32",
               "--max_len", "256"]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900,
                            env={**env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote the {bits}-bit GPTQ checkpoint to {out}" in result.stdout
    # gptqmodel's start-up banner and the other packages' start-up lines are quiet (qwen/_quiet.py); its progress
    # while quantizing is not.
    for noise in ("GPT-QModel", "GIL is enabled", "Failed to load", "Setting accelerator to CPU", "publisher trust"):
        assert noise not in result.stdout and noise not in result.stderr, noise
    assert list(work.iterdir()) == []  # gptqmodel's ./logs/ went into a staging folder, now removed
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # and so did the staging folder
    return out


@pytest.fixture(scope="module")
def int4_dir(gptq_stack, tmp_path_factory, tiny_chat_dir, calibration_file, scratch_env) -> Path:
    return run_gptq(tmp_path_factory, tiny_chat_dir, calibration_file, scratch_env, bits=4)


def test_run_gptq_writes_the_released_int4_layout(int4_dir, tiny_chat_dir, released_dir):
    names = sorted(p.name for p in int4_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "quantize_config.json",
                     "qwen.tiktoken", "tokenizer_config.json"]
    for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (int4_dir / name).read_bytes() == (tiny_chat_dir / name).read_bytes(), name

    released = json.loads((released_dir / "Qwen-VL-Chat-Int4" / "config.json").read_text())["quantization_config"]
    config = json.loads((int4_dir / "config.json").read_text())
    assert config["quantization_config"] == {**released, "group_size": 32, "checkpoint_format": "gptq"}
    assert config["torch_dtype"] == "float16" and config["fp16"] and not config["bf16"]
    quantize_config = json.loads((int4_dir / "quantize_config.json").read_text())
    assert quantize_config == {k: v for k, v in config["quantization_config"].items() if k != "quant_method"}

    tensors = folder_tensors(int4_dir)
    index = json.loads((released_dir / "Qwen-VL-Chat-Int4" / "model.safetensors.index.json").read_text())
    released_layer = sorted(k.removeprefix("transformer.h.0.") for k in index["weight_map"]
                            if k.startswith("transformer.h.0."))
    for layer in range(2):
        assert sorted(k.removeprefix(f"transformer.h.{layer}.") for k in tensors
                      if k.startswith(f"transformer.h.{layer}.")) == released_layer
    qwen_config = QWenConfig.from_pretrained(tiny_chat_dir)
    hidden, ff_dim = qwen_config.hidden_size, qwen_config.intermediate_size // 2
    expected_shapes = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.w1": (hidden, ff_dim),
                       "mlp.w2": (hidden, ff_dim), "mlp.c_proj": (ff_dim, hidden)}
    for name, (in_features, out_features) in expected_shapes.items():
        prefix = f"transformer.h.1.{name}"
        assert tensors[f"{prefix}.qweight"].dtype == torch.int32
        assert tensors[f"{prefix}.qweight"].shape == (in_features // 8, out_features)
        assert tensors[f"{prefix}.qzeros"].dtype == torch.int32
        assert tensors[f"{prefix}.qzeros"].shape == (in_features // 32, out_features // 8)
        assert tensors[f"{prefix}.scales"].dtype == torch.float16
        assert tensors[f"{prefix}.scales"].shape == (in_features // 32, out_features)
        assert torch.equal(tensors[f"{prefix}.g_idx"], torch.arange(in_features, dtype=torch.int32) // 32)
        assert tensors[f"{prefix}.bias"].dtype == torch.float16
        assert unpack(tensors[f"{prefix}.qzeros"], 4, dim=1).unique().tolist() == [7]  # sym: 8 stored minus one
        if name != "attn.c_attn":
            assert not tensors[f"{prefix}.bias"].any()
    assert tensors["transformer.wte.weight"].dtype == torch.float16


def test_our_class_and_the_auto_class_load_it_close_to_the_float_model(int4_dir, tiny_chat_model, tokenizer):
    import qwen  # noqa: F401  (registers the classes: AutoModelForCausalLM without remote code)
    from transformers import AutoModelForCausalLM

    ours = QWenLMHeadModel.from_pretrained(int4_dir, device_map="auto", dtype=torch.float32).eval()
    auto = AutoModelForCausalLM.from_pretrained(int4_dir, device_map="auto", dtype=torch.float32).eval()
    assert type(auto) is QWenLMHeadModel
    assert type(ours.transformer.h[0].mlp.w1).__module__.startswith("gptqmodel.")
    quantized = logits_of(ours)
    torch.testing.assert_close(logits_of(auto), quantized, rtol=0, atol=0)
    # Round-to-nearest 4-bit codes with one scale per 32 weights would leave each random weight off by ~8% of its
    # spread; GPTQ's error feedback brings this 2-layer model's logits to ~3% (relative L2, measured 2.6%). The bound
    # is 3x that, and a quarter of what zero points read one step off give (33%, measured with a mislabelled v2).
    error = relative_error(quantized, logits_of(tiny_chat_model))
    assert 0.002 < error < 0.08, error
    response, history = ours.chat(tokenizer, "你好", history=None, max_new_tokens=4, **GREEDY)
    assert history == [("你好", response)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_on_cpu(int4_dir, tokenizer, dtype):
    reference = logits_of(QWenLMHeadModel.from_pretrained(int4_dir, device_map="cpu", dtype=torch.float32))
    model = QWenLMHeadModel.from_pretrained(int4_dir, device_map="cpu", dtype=dtype).eval()
    assert model.dtype == dtype and model.config.bf16 == (dtype == torch.bfloat16)
    # Only the activations' rounding differs from the fp32 run (the int4 weights are the same): bf16 keeps 8 bits of
    # mantissa, ~0.4% per rounding; measured 0.5% for bf16 and 0.14% for fp16 over the whole model.
    assert relative_error(logits_of(model), reference) < 0.02
    assert isinstance(model.chat(tokenizer, "hi", history=None, max_new_tokens=3, **GREEDY)[0], str)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (gptqmodel's CUDA kernels)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_loads_it_like_the_cpu(int4_dir, tokenizer, dtype):
    reference = logits_of(QWenLMHeadModel.from_pretrained(int4_dir, device_map="cpu", dtype=torch.float32))
    model = QWenLMHeadModel.from_pretrained(int4_dir, device_map="auto", dtype=dtype).eval()
    assert model.device.type == "cuda"
    assert relative_error(logits_of(model), reference) < 0.03
    assert isinstance(model.chat(tokenizer, "hi", history=None, max_new_tokens=3, **GREEDY)[0], str)


def test_the_scripts_loader_reads_it_in_fp32_on_the_cpu(int4_dir):
    from qwen.loading import load_model_and_tokenizer

    # config.json says fp16 (as the released -Int4 ones do); on the CPU the loader's fp32 rule wins.
    model, tokenizer = load_model_and_tokenizer(int4_dir, cpu_only=True)
    assert model.dtype == torch.float32 and model.generation_config.chat_format == "chatml"
    assert isinstance(model.chat(tokenizer, "hi", history=None, max_new_tokens=3, **GREEDY)[0], str)


REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation import GenerationConfig

    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 9707, 11, 1879, 0]])
    for folder in sys.argv[1:]:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        model.generation_config = GenerationConfig.from_pretrained(folder, trust_remote_code=True)
        response, history = model.chat(tokenizer, "你好", history=None, do_sample=False, max_new_tokens=4)
        assert history == [("你好", response)]
        with torch.no_grad():
            torch.save(model(ids, use_cache=False).logits.float(), folder + "/logits.pt")
        print("REMOTE-OK", model.dtype)
    assert "qwen" not in sys.modules, "remote code must not import the installed qwen package"
""")


def test_trust_remote_code_loads_both_as_in_the_original_readme(tmp_path, scratch_env, int4_dir, hand_built_dir):
    folders = []
    for source in (int4_dir, hand_built_dir):
        folders.append(Path(shutil.copytree(source, tmp_path / f"remote-{source.name}")))
        install_code(folders[-1])
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, *map(str, folders)], capture_output=True,
                            text=True, env=scratch_env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The config's fp16 flag (as released) chooses fp16, on the CPU too, as the original code did.
    assert result.stdout.count("REMOTE-OK torch.float16") == 2, result.stdout
    for folder in folders:
        ours = logits_of(QWenLMHeadModel.from_pretrained(folder, device_map="auto", dtype=torch.float16))
        torch.testing.assert_close(torch.load(folder / "logits.pt"), ours, rtol=0, atol=0)


def test_run_gptq_bits_8_is_closer_to_the_float_model(tmp_path_factory, tiny_chat_dir, calibration_file,
                                                     scratch_env, tiny_chat_model, tokenizer, gptq_stack):
    from qwen.gptq import GPTQSettings, check_gptq_checkpoint

    int8_dir = run_gptq(tmp_path_factory, tiny_chat_dir, calibration_file, scratch_env, bits=8)
    assert check_gptq_checkpoint(int8_dir) == GPTQSettings(bits=8, group_size=32, desc_act=False, sym=True,
                                                           checkpoint_format="gptq")
    assert json.loads((int8_dir / "quantize_config.json").read_text())["bits"] == 8
    tensors = folder_tensors(int8_dir)
    hidden = tiny_chat_model.config.hidden_size
    assert tensors["transformer.h.0.attn.c_attn.qweight"].shape == (hidden // 4, 3 * hidden)  # 4 codes per word
    assert unpack(tensors["transformer.h.0.attn.c_attn.qzeros"], 8, dim=1).unique().tolist() == [127]  # sym v1

    model = QWenLMHeadModel.from_pretrained(int8_dir, device_map="cpu", dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        for name in LINEARS:
            prefix = f"transformer.h.{layer}.{name}"
            weight = dequantize_v1(tensors, prefix, bits=8)  # (out, in)
            x = torch.randn(8, weight.shape[1], generator=generator)
            expected = x @ weight.T + tensors[f"{prefix}.bias"].float()
            with torch.no_grad():
                out = model.get_submodule(prefix)(x)
            # 8-bit layers run gptqmodel's dequantize-then-matmul kernel: fp16 weights, 2^-11 relative each.
            assert ((out - expected).abs() <= 2**-10 * (x.abs() @ weight.abs().T) + 1e-6).all(), prefix
    # An 8-bit step is 1/16 of a 4-bit one: the 4-bit checkpoint's ~2.6% (relative L2) becomes ~0.16% (measured
    # 0.17%). The bound is 3x that, and a third of the 4-bit checkpoint's error.
    error = relative_error(logits_of(model), logits_of(tiny_chat_model))
    assert error < 0.005, error
    assert isinstance(model.chat(tokenizer, "hi", history=None, max_new_tokens=3, **GREEDY)[0], str)


@pytest.fixture(scope="module")
def v2_dir(int4_dir, tmp_path_factory) -> Path:
    return as_v2(int4_dir, tmp_path_factory.mktemp("v2") / "tiny-Int4-v2", label="gptq_v2")


def test_checkpoint_format_is_honoured(int4_dir, v2_dir):
    from qwen.gptq import check_gptq_checkpoint

    assert check_gptq_checkpoint(v2_dir).checkpoint_format == "gptq_v2"
    v1 = logits_of(QWenLMHeadModel.from_pretrained(int4_dir, device_map="cpu", dtype=torch.float32))
    v2 = logits_of(QWenLMHeadModel.from_pretrained(v2_dir, device_map="cpu", dtype=torch.float32))
    torch.testing.assert_close(v2, v1, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["run_gptq", "run_gptq_as_v2", "hand_built"])
def test_every_quantized_layer_computes_its_independently_dequantized_weight(request, which, gptq_stack):
    folder = request.getfixturevalue({"run_gptq": "int4_dir", "run_gptq_as_v2": "v2_dir",
                                      "hand_built": "hand_built_dir"}[which])
    reference_folder = request.getfixturevalue("int4_dir") if which == "run_gptq_as_v2" else folder
    tensors = folder_tensors(reference_folder)  # v1 tensors: the v2 copy holds the same model
    fused = QWenLMHeadModel.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    exact = QWenLMHeadModel.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for layer in range(fused.config.num_hidden_layers):
        for name in LINEARS:
            prefix = f"transformer.h.{layer}.{name}"
            weight = dequantize_v1(tensors, prefix, bits=4)  # (out, in)
            bias = tensors[f"{prefix}.bias"].float()
            x = torch.randn(8, weight.shape[1], generator=generator)
            expected = x @ weight.T + bias
            bound = (x.abs() @ weight.abs().T)
            # Training mode takes gptqmodel's dequantize-then-matmul path: fp16 scales times integer codes, rounded
            # once to fp16 (2^-11 relative), so every output is within 2^-10 of sum |x||W|.
            module = exact.get_submodule(prefix).train()
            with torch.no_grad():
                out = module(x)
            assert ((out - expected).abs() <= 2**-10 * bound + 1e-6).all(), (prefix, (out - expected).abs().max())
            # Inference on the CPU is torch's int4 matmul, which rounds inputs and scales to bf16 (2^-9 each).
            with torch.no_grad():
                out = fused.get_submodule(prefix)(x)
            assert ((out - expected).abs() <= 2**-7 * bound + 1e-5).all(), (prefix, (out - expected).abs().max())


def test_hand_built_released_layout_is_the_model_its_weights_say(hand_built_dir, tokenizer, gptq_stack):
    import qwen  # noqa: F401
    from transformers import AutoModelForCausalLM

    twin = logits_of(float_twin(hand_built_dir))
    model, info = AutoModelForCausalLM.from_pretrained(hand_built_dir, device_map="auto", dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    # Every tensor of the folder is used, and AutoGPTQ's zero biases on c_proj, w1 and w2 are not reported as unused.
    assert not any(info.values()), info
    # Same weights; only the int4 kernel's bf16 rounding of inputs and scales (~0.4% per layer) separates them.
    assert relative_error(logits_of(model), twin) < 0.03
    # As the README loads it: the released config's fp16 flag picks fp16.
    readme = QWenLMHeadModel.from_pretrained(hand_built_dir, device_map="auto").eval()
    assert readme.dtype == torch.float16
    assert relative_error(logits_of(readme), twin) < 0.03
    assert isinstance(readme.chat(tokenizer, "你好", history=None, max_new_tokens=3, **GREEDY)[0], str)


# --------------------------------------------------------------------------------------------------------------------
# Q-LoRA on the GPTQ checkpoint
# --------------------------------------------------------------------------------------------------------------------


def test_an_evaluation_before_training_leaves_the_gradients_alone(int4_dir):
    """gptqmodel's CPU kernel repacks for inference at its first no-grad forward, after which nothing backpropagates
    through it; prepare_lora_model keeps it on its training path."""
    from qwen.lora import LoraSettings, prepare_lora_model

    def first_layer_gradient(evaluate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = prepare_lora_model(int4_dir, LoraSettings(r=4, dropout=0.0, q_lora=True))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero, so that gradients reach the lora_A matrices
                torch.nn.init.normal_(parameter, std=0.1)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(PROMPT_IDS)
        model.train()
        model(PROMPT_IDS, labels=PROMPT_IDS).loss.backward()
        return model.get_submodule("base_model.model.transformer.h.0.attn.c_attn").lora_A["default"].weight.grad

    reference = first_layer_gradient(evaluate_first=False)
    assert reference.abs().max() > 0
    torch.testing.assert_close(first_layer_gradient(evaluate_first=True), reference, rtol=0, atol=0)


# 60 training steps through finetune.py: about 40 s on 2 CPU cores.
@pytest.mark.slow
def test_qlora_on_the_int4_checkpoint_trains_and_its_adapter_reloads(tmp_path, int4_dir, scratch_env):
    import qwen  # noqa: F401
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "who", "conversations": [{"from": "user", "value": QUESTION},
                                                                 {"from": "assistant", "value": ANSWER}]}]))
    adapter = tmp_path / "qlora"
    # As tests/test_finetune.py trains LoRA: lm_head as a module_to_save lets 60 CPU steps memorize the answer.
    command = [sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(int4_dir), "--data_path",
               str(data), "--output_dir", str(adapter), "--use_cpu", "--per_device_train_batch_size", "1",
               "--report_to", "none", "--lr_scheduler_type", "constant", "--logging_steps", "10", "--use_lora",
               "--q_lora", "--gradient_checkpointing", "--max_steps", "60", "--learning_rate", "1e-2", "--lora_r",
               "8", "--lora_dropout", "0", "--lora_modules_to_save", "lm_head", "--save_strategy", "no"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=scratch_env)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    assert Path(config["base_model_name_or_path"]) == int4_dir
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    assert type(model.base_model.model.transformer.h[0].mlp.w1.base_layer).__module__.startswith("gptqmodel.")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert model.chat(tokenizer, QUESTION, history=None, **GREEDY)[0] == ANSWER
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters themselves were trained

    from qwen.loading import LoadError
    from qwen.lora import merge_adapter

    with pytest.raises(LoadError, match="LoRA cannot be merged into quantized weights. Merge it into the 16-bit"):
        merge_adapter(adapter, tmp_path / "merged")

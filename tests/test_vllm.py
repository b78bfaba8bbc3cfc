"""examples/vllm_wrapper.py: prompts and stop settings on any machine; on vLLM itself where vLLM and a CUDA GPU are.

The vLLM tests check that the engine runs our converted checkpoint (and an original one through vLLM's own
QWenLMHeadModel) to the same greedy tokens as our model, with prompts built by make_context and replies cut at
<|im_end|>. Without vLLM, the original repository's `vLLMWrapper` runs against a stand-in for the engine that
records what the wrapper hands it.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from qwen.checkpoint import BASE_GENERATION_CONFIG, install_code, write_random_checkpoint
from qwen.convert import convert_checkpoint, qwen2_generation_config
from qwen.qwen_generation_utils import make_context

REPO = Path(__file__).resolve().parent.parent


def _load_wrapper():
    spec = importlib.util.spec_from_file_location("vllm_wrapper", REPO / "examples" / "vllm_wrapper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wrapper = _load_wrapper()


def _why_no_vllm() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (it needs a CUDA machine: pip install vllm there to run these tests)"
    if not torch.cuda.is_available():
        return "vLLM is installed but no CUDA GPU is visible"
    return None


needs_vllm = pytest.mark.skipif(_why_no_vllm() is not None, reason=_why_no_vllm() or "")


# ---------------------------------------------------------------------------------------------------------------------
# Without vLLM: what the wrapper hands the engine


@pytest.fixture(scope="module")
def converted_chat_dir(tmp_path_factory, tiny_chat_dir) -> Path:
    return convert_checkpoint(tiny_chat_dir, tmp_path_factory.mktemp("vllm-wrapper") / "chat")


def test_prompts_are_our_chatml_ids(converted_chat_dir, tokenizer_facts):
    chat_dir = converted_chat_dir
    layout, generation = wrapper.read_checkpoint(chat_dir)
    assert layout == "qwen2" and generation["chat_format"] == "chatml"
    tokenizer = wrapper.prompt_tokenizer(chat_dir)
    context = wrapper.checkpoint_context(chat_dir)
    assert context == 256 and wrapper.checkpoint_context(chat_dir, max_model_len=128) == 128
    for case in tokenizer_facts["chatml_prompts"]:
        history = [tuple(pair) for pair in case["history"] or []]
        ids = wrapper.chat_prompt_ids(tokenizer, generation, context, case["query"], history, case["system"])
        assert ids == case["prompt_ids"]
    # History beyond max_window_size is dropped oldest first, as chat() does (a model with room for it all).
    long_history = [("q" * 50, "a" * 50)] * 200
    ids = wrapper.chat_prompt_ids(tokenizer, {**generation, "max_window_size": 300}, 8192, "hi", long_history)
    assert ids == make_context(tokenizer, "hi", long_history, "You are a helpful assistant.", max_window_size=300)[1]
    assert len(ids) < 300
    # In this checkpoint's 256 positions the window gives way so that the reply keeps its room (half the context,
    # as the reply asks for 512), as every front end here does.
    turn = wrapper.wrapper_turn(tokenizer, {**generation, "max_window_size": 300}, context, "hi", long_history)
    assert turn.prompt_ids == make_context(tokenizer, "hi", long_history, "You are a helpful assistant.",
                                           max_window_size=128)[1]
    assert len(turn.prompt_ids) < 128 and turn.max_new_tokens == context - len(turn.prompt_ids)


def test_sampling_settings_follow_the_generation_config(converted_chat_dir):
    tokenizer = wrapper.prompt_tokenizer(converted_chat_dir)
    settings = wrapper.sampling_settings(wrapper.read_checkpoint(converted_chat_dir)[1], tokenizer)
    assert settings == {"temperature": 1.0, "top_p": 0.8, "top_k": -1, "repetition_penalty": 1.1, "max_tokens": 512,
                        "stop_token_ids": [151645, 151644, 151643]}
    # A base model's converted generation config (the same mapping the converter writes, without weights).
    base_generation = qwen2_generation_config(BASE_GENERATION_CONFIG)
    base = wrapper.sampling_settings(base_generation, tokenizer, temperature=0.0, max_tokens=8)
    assert base["stop_token_ids"] == [151643] and base["temperature"] == 0.0 and base["max_tokens"] == 8
    assert wrapper.sampling_settings({"do_sample": False}, tokenizer)["temperature"] == 0.0


def test_cli_refuses_a_folder_that_is_not_qwen(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit, match=r"^error: .* holds a 'llama' model"):
        wrapper.main(["-c", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: .* has no config.json"):
        wrapper.main(["-c", str(tmp_path / "nowhere")])


# ---------------------------------------------------------------------------------------------------------------------
# The original repository's vLLMWrapper: its arguments, and what it hands the engine


def test_vllm_wrapper_keeps_the_original_signatures():
    init = inspect.signature(wrapper.vLLMWrapper.__init__).parameters
    assert [(name, p.default) for name, p in init.items()][1:6] == [
        ("model_dir", inspect.Parameter.empty), ("trust_remote_code", True), ("tensor_parallel_size", 1),
        ("gpu_memory_utilization", 0.98), ("dtype", "bfloat16")]
    assert init["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    chat = inspect.signature(wrapper.vLLMWrapper.chat).parameters
    assert list(chat)[1:6] == ["query", "history", "tokenizer", "system", "generation_config"]
    assert chat["system"].default == "You are a helpful assistant." and chat["tokenizer"].default is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_wrapper_without_vllm_says_how_to_get_it(tiny_chat_dir):
    with pytest.raises(ImportError, match=r"^vLLM is not installed .*pip install vllm"):
        wrapper.vLLMWrapper(str(tiny_chat_dir))
    with pytest.raises(ValueError, match=r"^dtype 'int8' is not supported: use one of bfloat16, float16, float32"):
        wrapper.vLLMWrapper(str(tiny_chat_dir), dtype="int8")  # checked first, as in the original


class _EngineStandIn:
    """Stands in for `vllm.LLM` (vLLM needs CUDA): records what the wrapper hands it and answers with fixed ids."""

    def __init__(self, **options):
        self.options = options
        self.calls: list[tuple[list, dict]] = []
        self.reply_ids: list[int] = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params.settings))
        output = types.SimpleNamespace(token_ids=list(self.reply_ids))
        return [types.SimpleNamespace(outputs=[output]) for _ in prompts]


@pytest.fixture
def vllm_stand_in(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _EngineStandIn
    module.SamplingParams = lambda **settings: types.SimpleNamespace(settings=settings)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_wrapper_hands_the_engine_chat_prompts_and_the_checkpoint_settings(vllm_stand_in, tiny_chat_dir,
                                                                               tokenizer, tokenizer_facts):
    model = wrapper.vLLMWrapper(str(tiny_chat_dir), tensor_parallel_size=2, max_model_len=256)
    assert model.model.options == {"model": str(tiny_chat_dir), "trust_remote_code": True, "tensor_parallel_size": 2,
                                   "dtype": "bfloat16", "gpu_memory_utilization": 0.98, "max_model_len": 256}
    assert model.stop_words_ids == [151645, 151644, 151643]  # the original: its chatml stop ids, then eos
    assert model.generation_config.chat_format == "chatml" and model.generation_config.top_p == 0.8

    model.model.reply_ids = tokenizer.encode("你好！很高兴为你提供帮助。") + [tokenizer.im_end_id]
    first, second = tokenizer_facts["chatml_prompts"][:2]  # a first turn, and the turn after it
    history = [tuple(pair) for pair in second["history"]]
    response, new_history = model.chat(query=second["query"], history=history)
    prompts, settings = model.model.calls[-1]
    assert prompts == [{"prompt_token_ids": second["prompt_ids"]}]
    # The checkpoint's 512 new tokens, cut to what its 256 positions leave after the prompt.
    assert settings == {"temperature": 1.0, "top_p": 0.8, "top_k": -1, "repetition_penalty": 1.1,
                        "max_tokens": 256 - len(second["prompt_ids"]), "stop_token_ids": [151645, 151644, 151643]}
    assert response == "你好！很高兴为你提供帮助。"
    assert new_history == [*history, (second["query"], response)] and history == [tuple(second["history"][0])]
    model.chat(first["query"], None)
    assert model.model.calls[-1][0] == [{"prompt_token_ids": first["prompt_ids"]}]


def test_vllm_wrapper_chat_options(vllm_stand_in, tiny_chat_dir, tiny_base_dir, tokenizer):
    model = wrapper.vLLMWrapper(str(tiny_chat_dir))
    model.model.reply_ids = tokenizer.encode("Hi") + [7]
    greedy = GenerationConfig(**{**model.generation_config.to_dict(), "do_sample": False, "max_new_tokens": 9})
    long_history = [("q" * 50, "a" * 50)] * 40
    response, _ = model.chat("hi", long_history, generation_config=greedy, max_window_size=300, stop_words_ids=[[7]])
    prompts, settings = model.model.calls[-1]
    # The asked window (300) gives way to the reply's 9 tokens in the checkpoint's 256 positions.
    assert prompts[0]["prompt_token_ids"] == make_context(tokenizer, "hi", long_history, "You are a helpful assistant.",
                                                          max_window_size=256 - 9)[1]
    assert settings["temperature"] == 0.0 and settings["max_tokens"] == 9
    assert settings["stop_token_ids"] == [151645, 151644, 151643, 7]
    assert response == "Hi"  # the extra stop token the engine stopped on is not part of the reply
    with pytest.raises(TypeError, match="unexpected keyword arguments: stream"):
        model.chat("hi", None, stream=True)
    with pytest.raises(ValueError, match="single-token sequences"):
        model.chat("hi", None, stop_words_ids=[[1, 2]])
    base = wrapper.vLLMWrapper(str(tiny_base_dir))
    with pytest.raises(ValueError, match=r"needs a chat model: .* chat_format 'raw'"):
        base.chat("hi", None)


# ---------------------------------------------------------------------------------------------------------------------
# With vLLM and CUDA


@pytest.fixture(scope="module")
def gpu_checkpoints(tmp_path_factory, vocab_file) -> tuple[Path, Path]:
    """An original and a converted chat checkpoint with 64-wide heads, a size every vLLM attention backend takes."""
    root = tmp_path_factory.mktemp("vllm")
    original = write_random_checkpoint(root / "original", size="tiny", seed=5, hidden_size=256, num_attention_heads=4,
                                       kv_channels=64, intermediate_size=1024)
    install_code(original)  # vLLM reads an original folder's config through its remote code
    return original, convert_checkpoint(original, root / "converted")


def _engine(folder: Path):
    return wrapper.QwenVLLM(folder, dtype="float32", gpu_memory_utilization=0.25, enforce_eager=True,
                            max_model_len=256)


def _close(engine) -> None:
    del engine.llm
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def _assert_greedy_like_ours(folder: Path, prompt: list[int], generated: list[int]) -> None:
    """Each token vLLM chose greedily is our model's top token at that step, up to float rounding (ties allowed)."""
    from qwen import QWenLMHeadModel

    assert generated, "vLLM generated nothing"
    model = QWenLMHeadModel.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    logits = model(torch.tensor([prompt + generated], device="cuda")).logits[0, len(prompt) - 1:-1]
    chosen = logits.gather(1, torch.tensor(generated, device="cuda")[:, None])[:, 0]
    assert torch.all(logits.max(dim=1).values - chosen < 1e-3), (generated, logits.argmax(dim=1).tolist())


@needs_vllm
def test_converted_checkpoint_on_vllm_chats_like_ours(gpu_checkpoints):
    original, converted = gpu_checkpoints
    engine = _engine(converted)
    try:
        history = [("你好", "你好！很高兴为你提供帮助。")]
        prompt = wrapper.chat_prompt_ids(engine.tokenizer, engine.generation, engine.context, "Tell me a story.", history)
        # A random model rarely says <|im_end|> early; ignore_eos is not set, so the stop ids are live throughout.
        generated = engine.generate_ids([prompt], temperature=0.0, max_tokens=12, repetition_penalty=1.0)[0]
        _assert_greedy_like_ours(original, prompt, generated)

        reply, new_history = engine.chat("Tell me a story.", history=history, temperature=0.0, max_tokens=12,
                                         repetition_penalty=1.0)
        assert new_history == history + [("Tell me a story.", reply)]
        assert reply == wrapper.decode_tokens(prompt + generated, engine.tokenizer, context_length=len(prompt))
    finally:
        _close(engine)


@needs_vllm
def test_reply_stops_at_im_end(gpu_checkpoints):
    _, converted = gpu_checkpoints
    engine = _engine(converted)
    try:
        prompt = wrapper.chat_prompt_ids(engine.tokenizer, engine.generation, engine.context, "hi")
        # Push the model to say "Hello" then <|im_end|>: the reply must stop there, the stop token not in the text.
        hello = engine.tokenizer.encode("Hello")[0]
        generated = engine.generate_ids([prompt], temperature=0.0, max_tokens=8, logit_bias={hello: 50.0})[0]
        assert generated[0] == hello
        generated = engine.generate_ids([prompt + [hello]], temperature=0.0, max_tokens=8,
                                        logit_bias={151645: 50.0})[0]
        assert generated == [151645]
        reply = wrapper.decode_tokens(prompt + [hello] + generated, engine.tokenizer, context_length=len(prompt))
        assert reply == "Hello"
    finally:
        _close(engine)


@needs_vllm
def test_original_checkpoint_on_vllm_with_remote_code(gpu_checkpoints):
    original, _ = gpu_checkpoints
    engine = _engine(original)
    try:
        prompt = wrapper.chat_prompt_ids(engine.tokenizer, engine.generation, engine.context, "Tell me a story.")
        generated = engine.generate_ids([prompt], temperature=0.0, max_tokens=12, repetition_penalty=1.0)[0]
        _assert_greedy_like_ours(original, prompt, generated)
    finally:
        _close(engine)


@needs_vllm
def test_original_wrapper_on_vllm_replies_like_our_engine_class(gpu_checkpoints):
    _, converted = gpu_checkpoints
    model = wrapper.vLLMWrapper(str(converted), dtype="float32", gpu_memory_utilization=0.25, enforce_eager=True,
                                max_model_len=256)
    try:
        greedy = GenerationConfig(**{**model.generation_config.to_dict(), "do_sample": False, "max_new_tokens": 12,
                                     "repetition_penalty": 1.0})
        reply, history = model.chat("Tell me a story.", None, generation_config=greedy)
        prompt = wrapper.chat_prompt_ids(model.tokenizer, model.engine.generation, model.engine.context, "Tell me a story.")
        generated = model.engine.generate_ids([prompt], temperature=0.0, max_tokens=12, repetition_penalty=1.0)[0]
        assert reply == wrapper.decode_tokens(prompt + generated, model.tokenizer, context_length=len(prompt))
        assert history == [("Tell me a story.", reply)]
    finally:
        _close(model.engine)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

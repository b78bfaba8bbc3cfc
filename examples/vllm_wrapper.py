"""Chat with a Qwen (v1) checkpoint on vLLM's offline engine, with prompts and stops exactly as `chat()` makes them.

    python examples/vllm_wrapper.py -c FOLDER [--tensor-parallel-size N] [--dtype auto] [--query TEXT]

FOLDER is either a checkpoint converted with `python -m qwen.convert` (vLLM runs it as Qwen2ForCausalLM, no remote
code), or an original Qwen (v1) folder, which vLLM runs with its own QWenLMHeadModel and reads with
`trust_remote_code=True`: released folders ship their .py files, folders made here get ours with
`python -m qwen.checkpoint install-code FOLDER`. Neither engine path has Qwen (v1)'s dynamic NTK and logn scaling,
so keep prompts plus replies within the checkpoint's `seq_length` (the converted config says so as
`max_position_embeddings`, which vLLM takes as its default `max_model_len`).

The prompt is the library's chat turn (`qwen.chat_turn.chat_turn`) with our tokenizer, handed to vLLM as token ids:
history is trimmed by the same window policy as every front end here (the checkpoint's `max_window_size`, leaving
the reply room in the context vLLM runs), text that looks like `<|im_end|>` inside a message stays text, and the
reply stops on the same tokens (`<|im_end|>`, `<|im_start|>`, `<|endoftext|>`). vLLM only runs the model.

In Python:

    from examples.vllm_wrapper import QwenVLLM

    model = QwenVLLM("Qwen-7B-Chat-qwen2", tensor_parallel_size=2)
    reply, history = model.chat("你好", history=None)
    reply, history = model.chat("Give me a title for that story.", history=history)
    replies = model.chat_batch([("Hello", None), ("1+1=?", None)])  # one batched engine call

Code written for the original repository's wrapper runs unchanged (`vLLMWrapper`, same arguments and defaults):

    from vllm_wrapper import vLLMWrapper

    model = vLLMWrapper("Qwen/Qwen-7B-Chat", tensor_parallel_size=1)
    response, history = model.chat(query="你好", history=None)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import GenerationConfig

# Run as `python examples/vllm_wrapper.py` from a clone: the qwen package sits one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen.chat_turn import ChatTurn, chat_turn  # noqa: E402
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, HistoryType, decode_tokens, reply_end_ids  # noqa: E402
from qwen.tokenization_qwen import VOCAB_FILE_NAME, QWenTokenizer  # noqa: E402


def local_folder(name: str | Path) -> Path:
    """A checkpoint folder, or a hub id such as Qwen/Qwen-7B-Chat downloaded into the hub cache (as vLLM would)."""
    path = Path(name).expanduser()
    if path.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(name)):
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name)))


def read_checkpoint(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """The checkpoint's layout ("qwen" for original, "qwen2" for converted) and its generation settings."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a Qwen checkpoint folder.")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("qwen", "qwen2"):
        raise ValueError(f"{folder} holds a {model_type!r} model; this wrapper runs Qwen (v1) checkpoints, original "
                         "or converted with `python -m qwen.convert`.")
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    return model_type, generation


def prompt_tokenizer(folder: str | Path) -> QWenTokenizer:
    """Our tokenizer, from the folder's qwen.tiktoken (converted folders carry a copy) or the cached download."""
    vocab = Path(folder) / VOCAB_FILE_NAME
    if not vocab.is_file():
        from qwen.vocab import find_vocab

        vocab = find_vocab()
    return QWenTokenizer(str(vocab))


def checkpoint_context(folder: str | Path, max_model_len: int | None = None) -> int:
    """Positions a prompt and its reply may take on vLLM: `max_model_len` when given, else the config's
    `max_position_embeddings` (converted) or `seq_length` (original; vLLM has no dynamic NTK to stretch it)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    context = config["max_position_embeddings"] if config.get("model_type") == "qwen2" else config["seq_length"]
    return min(context, max_model_len) if max_model_len else context


def wrapper_turn(tokenizer: QWenTokenizer, generation: dict[str, Any], context: int, query: str,
                 history: HistoryType | None = None, system: str = DEFAULT_SYSTEM_PROMPT) -> ChatTurn:
    """The library's chat turn for `query`: the prompt `chat()` feeds the model, the reply's budget and stops."""
    return chat_turn(tokenizer, query, history, system, SimpleNamespace(**generation), context)


def chat_prompt_ids(tokenizer: QWenTokenizer, generation: dict[str, Any], context: int, query: str,
                    history: HistoryType | None = None, system: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The prompt ids of `wrapper_turn`."""
    return wrapper_turn(tokenizer, generation, context, query, history, system).prompt_ids


def sampling_settings(generation: dict[str, Any], tokenizer: QWenTokenizer, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` from a generation config, then `overrides` (vLLM's names)."""
    stop_ids = reply_end_ids(generation.get("chat_format", "chatml"), tokenizer)
    settings: dict[str, Any] = {
        # do_sample false in a generation config means greedy, which vLLM spells temperature 0.
        "temperature": generation.get("temperature", 1.0) if generation.get("do_sample", True) else 0.0,
        "top_p": generation.get("top_p", 1.0),
        # Released configs say top_k 0 for "off"; vLLM releases before 0.8 accept only -1 for that, later ones both.
        "top_k": generation.get("top_k") or -1,
        "repetition_penalty": generation.get("repetition_penalty", 1.0),
        "max_tokens": generation.get("max_new_tokens", 512),
        "stop_token_ids": stop_ids,
    }
    settings.update(overrides)
    return settings


class QwenVLLM:
    """A Qwen (v1) chat model on vLLM's offline `LLM`: `chat()` with history, `chat_batch()`, `generate_ids()`.

    `engine_options` go to `vllm.LLM` unchanged (`gpu_memory_utilization`, `enforce_eager`, `max_model_len`,
    `quantization`, ...).
    """

    def __init__(
        self,
        folder: str | Path,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        trust_remote_code: bool | None = None,
        **engine_options: Any,
    ) -> None:
        self.folder = local_folder(folder)
        layout, self.generation = read_checkpoint(self.folder)
        self.chat_format = self.generation.get("chat_format", "chatml")
        self.tokenizer = prompt_tokenizer(self.folder)
        self.context = checkpoint_context(self.folder, engine_options.get("max_model_len"))
        LLM = _vllm().LLM
        self.llm = LLM(
            model=str(self.folder),
            # Only original folders need their code (vLLM has no built-in config class for model_type "qwen"), so
            # by default a converted one runs without remote code.
            trust_remote_code=layout == "qwen" if trust_remote_code is None else trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            **engine_options,
        )

    def sampling_params(self, **overrides: Any) -> Any:
        return _vllm().SamplingParams(**sampling_settings(self.generation, self.tokenizer, **overrides))

    def generate_ids(self, prompts: list[list[int]], **sampling: Any) -> list[list[int]]:
        """Generated token ids for each prompt (token ids), in one batched engine call."""
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], self.sampling_params(**sampling),
                                    use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def chat_batch(self, conversations: list[tuple[str, HistoryType | None]], system: str = DEFAULT_SYSTEM_PROMPT,
                   **sampling: Any) -> list[str]:
        """Replies to several (query, history) pairs at once; vLLM batches them on the GPU(s)."""
        turns = [wrapper_turn(self.tokenizer, self.generation, self.context, query, history, system)
                 for query, history in conversations]
        outputs = self.llm.generate(
            [{"prompt_token_ids": turn.prompt_ids} for turn in turns],
            [self.sampling_params(**{"max_tokens": turn.max_new_tokens, **sampling}) for turn in turns],
            use_tqdm=False,
        )
        return [decode_tokens(turn.prompt_ids + list(output.outputs[0].token_ids), self.tokenizer,
                              context_length=len(turn.prompt_ids), chat_format=self.chat_format)
                for turn, output in zip(turns, outputs)]

    def chat(self, query: str, history: HistoryType | None = None, system: str = DEFAULT_SYSTEM_PROMPT,
             **sampling: Any) -> tuple[str, HistoryType]:
        """One reply and the history including it, like the released `model.chat(tokenizer, query, history)`."""
        response = self.chat_batch([(query, history)], system=system, **sampling)[0]
        return response, [*(history or []), (query, response)]


def _vllm() -> Any:
    """The vllm package, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"vLLM is not installed ({error}); on a CUDA machine: pip install vllm.") from None
    return vllm


VLLM_WRAPPER_DTYPES = ("bfloat16", "float16", "float32")
GENERATION_KEYS = ("chat_format", "max_window_size", "do_sample", "temperature", "top_p", "top_k",
                   "repetition_penalty", "max_new_tokens")


class vLLMWrapper:  # noqa: N801 - the original repository's name, kept so its code runs unchanged
    """The original repository's wrapper: `vLLMWrapper(model_dir, ...)` and `chat(query, history, ...)`, with the
    same arguments and defaults, on `QwenVLLM` (prompts and stops exactly as `model.chat()` makes them).

    `model_dir` is a local folder, original or converted. `generation_config` (a transformers GenerationConfig, read
    from the folder) decides sampling as in `chat()`, `do_sample=False` meaning greedy; other keyword arguments go to
    `vllm.LLM` (`quantization`, `max_model_len`, `enforce_eager`, ...).
    """

    def __init__(
        self,
        model_dir: str,
        trust_remote_code: bool = True,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.98,
        dtype: str = "bfloat16",
        **kwargs: Any,
    ) -> None:
        if dtype not in VLLM_WRAPPER_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported: use one of {', '.join(VLLM_WRAPPER_DTYPES)}.")
        _vllm()  # before reading the folder: without vLLM nothing here can run
        self.engine = QwenVLLM(model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                               trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
                               **kwargs)
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.llm
        self.generation_config = GenerationConfig(**self.engine.generation)
        self.stop_words_ids = reply_end_ids(self.engine.chat_format, self.tokenizer)

    def chat(
        self,
        query: str,
        history: HistoryType | None = None,
        tokenizer: Any = None,
        system: str = DEFAULT_SYSTEM_PROMPT,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> tuple[str, HistoryType]:
        """(reply, history + [(query, reply)]); the caller's history is not changed.

        As in the original: `max_window_size=` overrides the generation config's, and `stop_words_ids=` adds stop
        tokens (single-token sequences: vLLM stops on token ids); `tokenizer` replaces the wrapper's for this turn.
        """
        options = dict(kwargs)
        max_window_size = options.pop("max_window_size", None)
        extra_stops = options.pop("stop_words_ids", None) or []
        if options:
            raise TypeError(f"vLLMWrapper.chat() got unexpected keyword arguments: {', '.join(sorted(options))}.")
        if any(len(ids) != 1 for ids in extra_stops):
            raise ValueError(f"stop_words_ids must be single-token sequences for vLLM, got {extra_stops!r}.")
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        generation = generation_settings(generation_config if generation_config is not None
                                         else self.generation_config)
        if generation.get("chat_format", "chatml") != "chatml":
            raise ValueError("vLLMWrapper.chat() needs a chat model: this generation config has chat_format "
                             f"{generation['chat_format']!r} (a base model). Use a -Chat checkpoint.")
        if max_window_size is not None:
            generation["max_window_size"] = max_window_size
        turn = wrapper_turn(tokenizer, generation, self.engine.context, query, history, system)
        prompt = turn.prompt_ids
        stop_ids = list(dict.fromkeys(list(turn.stop_token_ids) + [ids[0] for ids in extra_stops]))
        params = _vllm().SamplingParams(**sampling_settings(generation, tokenizer, stop_token_ids=stop_ids,
                                                            max_tokens=turn.max_new_tokens))
        generated = list(self.model.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
                         .outputs[0].token_ids)
        if generated and generated[-1] in stop_ids:  # vLLM ends the ids with the stop token it stopped on
            generated.pop()
        response = decode_tokens(prompt + generated, tokenizer, context_length=len(prompt))
        return response, [*(history or []), (query, response)]


def generation_settings(config: GenerationConfig) -> dict[str, Any]:
    """The generation-config fields the wrapper reads, from a transformers GenerationConfig."""
    values = config.to_dict()
    return {key: values[key] for key in GENERATION_KEYS if values.get(key) is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", required=True, help="original or converted Qwen (v1) folder")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model across")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (default: from the config)")
    parser.add_argument("--query", help="ask one question and exit instead of chatting")
    args = parser.parse_args(argv)
    try:
        read_checkpoint(args.checkpoint_path)  # a wrong folder fails here in one line, before vLLM starts
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    model = QwenVLLM(args.checkpoint_path, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                     max_model_len=args.max_model_len)
    if args.query is not None:
        print(model.chat(args.query)[0])
        return
    history: HistoryType = []
    print("Type a message; :clear forgets the conversation, :quit (or Ctrl-D) leaves.")
    while True:
        try:
            query = input("\nUser> ").strip()
        except EOFError:
            break
        if query == ":quit":
            break
        if query == ":clear":
            history = []
            continue
        if query:
            response, history = model.chat(query, history)
            print(f"\nQwen> {response}")


if __name__ == "__main__":
    main()

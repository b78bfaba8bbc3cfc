"""Chat with a Qwen (v1) checkpoint on vLLM's offline engine, with prompts and stops exactly as `chat()` makes them.

    python examples/vllm_wrapper.py -c FOLDER [--tensor-parallel-size N] [--dtype auto] [--query TEXT]

FOLDER is either a checkpoint converted with `python -m qwen.convert` (vLLM runs it as Qwen2ForCausalLM, no remote
code), or an original Qwen (v1) folder, which vLLM runs with its own QWenLMHeadModel and reads with
`trust_remote_code=True`: released folders ship their .py files, folders made here get ours with
`python -m qwen.checkpoint install-code FOLDER`. Neither engine path has Qwen (v1)'s dynamic NTK and logn scaling,
so keep prompts plus replies within the checkpoint's `seq_length` (the converted config says so as
`max_position_embeddings`, which vLLM takes as its default `max_model_len`).

The prompt is built by `qwen.qwen_generation_utils.make_context` with our tokenizer and handed to vLLM as token ids:
history is trimmed to `max_window_size` the same way, text that looks like `<|im_end|>` inside a message stays text,
and the reply stops on the same tokens (`<|im_end|>`, `<|im_start|>`, `<|endoftext|>`). vLLM only runs the model.

In Python:

    from examples.vllm_wrapper import QwenVLLM

    model = QwenVLLM("Qwen-7B-Chat-qwen2", tensor_parallel_size=2)
    reply, history = model.chat("你好", history=None)
    reply, history = model.chat("Give me a title for that story.", history=history)
    replies = model.chat_batch([("Hello", None), ("1+1=?", None)])  # one batched engine call
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Run as `python examples/vllm_wrapper.py` from a clone: the qwen package sits one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen.qwen_generation_utils import (  # noqa: E402
    DEFAULT_MAX_WINDOW_SIZE,
    DEFAULT_SYSTEM_PROMPT,
    HistoryType,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)
from qwen.tokenization_qwen import VOCAB_FILE_NAME, QWenTokenizer  # noqa: E402


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


def chat_prompt_ids(tokenizer: QWenTokenizer, generation: dict[str, Any], query: str,
                    history: HistoryType | None = None, system: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The prompt ids `chat()` feeds the model for this turn, with the checkpoint's chat format and window."""
    return make_context(tokenizer, query, history=history, system=system,
                        max_window_size=generation.get("max_window_size", DEFAULT_MAX_WINDOW_SIZE),
                        chat_format=generation.get("chat_format", "chatml"))[1]


def sampling_settings(generation: dict[str, Any], tokenizer: QWenTokenizer, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` from a generation config, then `overrides` (vLLM's names)."""
    chat_format = generation.get("chat_format", "chatml")
    stop_ids = [ids[0] for ids in get_stop_words_ids(chat_format, tokenizer)]
    settings: dict[str, Any] = {
        # do_sample false in a generation config means greedy, which vLLM spells temperature 0.
        "temperature": generation.get("temperature", 1.0) if generation.get("do_sample", True) else 0.0,
        "top_p": generation.get("top_p", 1.0),
        # Released configs say top_k 0 for "off"; vLLM releases before 0.8 accept only -1 for that, later ones both.
        "top_k": generation.get("top_k") or -1,
        "repetition_penalty": generation.get("repetition_penalty", 1.0),
        "max_tokens": generation.get("max_new_tokens", 512),
        "stop_token_ids": list(dict.fromkeys(stop_ids + [tokenizer.eod_id])),
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
        **engine_options: Any,
    ) -> None:
        from vllm import LLM

        self.folder = Path(folder)
        layout, self.generation = read_checkpoint(self.folder)
        self.chat_format = self.generation.get("chat_format", "chatml")
        self.tokenizer = prompt_tokenizer(self.folder)
        self.llm = LLM(
            model=str(self.folder),
            # Only original folders need their code: vLLM has no built-in config class for model_type "qwen".
            trust_remote_code=layout == "qwen",
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            **engine_options,
        )

    def sampling_params(self, **overrides: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(**sampling_settings(self.generation, self.tokenizer, **overrides))

    def generate_ids(self, prompts: list[list[int]], **sampling: Any) -> list[list[int]]:
        """Generated token ids for each prompt (token ids), in one batched engine call."""
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], self.sampling_params(**sampling),
                                    use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def chat_batch(self, conversations: list[tuple[str, HistoryType | None]], system: str = DEFAULT_SYSTEM_PROMPT,
                   **sampling: Any) -> list[str]:
        """Replies to several (query, history) pairs at once; vLLM batches them on the GPU(s)."""
        prompts = [chat_prompt_ids(self.tokenizer, self.generation, query, history, system)
                   for query, history in conversations]
        generated = self.generate_ids(prompts, **sampling)
        return [decode_tokens(prompt + ids, self.tokenizer, len(prompt), chat_format=self.chat_format)
                for prompt, ids in zip(prompts, generated)]

    def chat(self, query: str, history: HistoryType | None = None, system: str = DEFAULT_SYSTEM_PROMPT,
             **sampling: Any) -> tuple[str, HistoryType]:
        """One reply and the history including it, like the released `model.chat(tokenizer, query, history)`."""
        response = self.chat_batch([(query, history)], system=system, **sampling)[0]
        return response, [*(history or []), (query, response)]


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

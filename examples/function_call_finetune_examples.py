"""Fine-tuning samples that teach Qwen-Chat to call functions, in the ReAct text the API server prompts with.

    python examples/function_call_finetune_examples.py                 # writes example_func_call_train_samples.json
    python finetune.py --data_path example_func_call_train_samples.json ...

Qwen (v1) has no function-call tokens: it calls functions through a ReAct transcript written inside ordinary chat
turns (`Thought:` / `Action:` / `Action Input:` / `Observation:` / `Final Answer:`, see `qwen/react.py`). So function
calling is fine-tuned with ordinary conversation samples whose text is that transcript, and what matters is that the
text is exactly what the model will be prompted with later.

That is why the samples here are written as OpenAI-style conversations, as a client sends them to `openai_api.py`
(`tool_calls` on assistant messages, `tool` messages with the results), and converted by the code the server uses:
the conversation up to its last question becomes the sample's earlier turns and question, laid out exactly as the
server lays out that request (the tool descriptions and the ReAct instructions included), and the rest of the
conversation (calls, results, final answer) becomes the reply the model learns to write. Replace `EXAMPLES` and
`FUNCTIONS` with your own conversations and functions; a few hundred varied conversations are a sensible start.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen import react
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT

# Functions as the OpenAI API describes them (`functions=`, or the `function` of each entry of `tools=`).
FUNCTIONS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "Current weather of a city: temperature in °C and conditions.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                       "required": ["city"]},
    },
    {
        "name": "convert_currency",
        "description": "Convert an amount of money between two currencies at today's rate.",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "from": {"type": "string", "description": "ISO code"},
                           "to": {"type": "string", "description": "ISO code"}},
            "required": ["amount", "from", "to"],
        },
    },
]


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# Each conversation ends with the assistant's last reply: that last round is what its sample teaches.
EXAMPLES: list[list[dict[str, Any]]] = [
    # One call, then the answer from its result.
    [
        {"role": "user", "content": "Do I need an umbrella in Hangzhou today?"},
        {"role": "assistant", "content": "I should check the weather in Hangzhou.",
         "tool_calls": [_call("call_1", "get_weather", {"city": "Hangzhou"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 19, "conditions": "light rain"}'},
        {"role": "assistant", "content": "Yes: there is light rain in Hangzhou (19 °C), so take an umbrella."},
    ],
    # Two calls in a row, the second one using the first one's result.
    [
        {"role": "system", "content": "You are a travel assistant. Keep answers short."},
        {"role": "user", "content": "I have 200 euros. How many yen is that, and is it warm in Osaka?"},
        {"role": "assistant", "content": "First I convert the money.",
         "tool_calls": [_call("call_1", "convert_currency", {"amount": 200, "from": "EUR", "to": "JPY"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"amount": 32410, "currency": "JPY"}'},
        {"role": "assistant", "content": "Now the weather in Osaka.",
         "tool_calls": [_call("call_2", "get_weather", {"city": "Osaka"})]},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 27, "conditions": "sunny"}'},
        {"role": "assistant", "content": "200 EUR is about 32,410 JPY, and Osaka is warm: 27 °C and sunny."},
    ],
    # Several rounds: a call, a question that needs none, then a call again.
    [
        {"role": "user", "content": "What's the weather in Oslo?"},
        {"role": "assistant", "content": "I should look it up.",
         "tool_calls": [_call("call_1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": -3, "conditions": "snow"}'},
        {"role": "assistant", "content": "It is -3 °C and snowing in Oslo."},
        {"role": "user", "content": "Thanks! What should I wear?"},
        {"role": "assistant", "content": "A warm coat, a hat, gloves and waterproof boots."},
        {"role": "user", "content": "And how much is 50 NOK in US dollars?"},
        {"role": "assistant", "content": "I need today's exchange rate.",
         "tool_calls": [_call("call_2", "convert_currency", {"amount": 50, "from": "NOK", "to": "USD"})]},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"amount": 4.62, "currency": "USD"}'},
        {"role": "assistant", "content": "50 NOK is about 4.62 USD."},
    ],
    # Tools are offered but not needed: the model answers directly.
    [
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "The capital of Japan is Tokyo."},
    ],
]


def training_sample(messages: Sequence[Mapping[str, Any]], functions: Sequence[Mapping[str, Any]],
                    sample_id: str) -> dict[str, Any]:
    """The fine-tuning sample (`finetune.py`'s format) that teaches the last round of `messages`.

    Its turns up to the last question are what the server builds for the request `messages[:last question + 1]`,
    and its last assistant turn is the ReAct transcript of everything after that question.
    """
    questions = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if not questions or questions[-1] == len(messages) - 1:
        raise ValueError(f"{sample_id}: the conversation must end with the assistant's reply to a question.")
    system, history, question = react.build_react_conversation(messages[:questions[-1] + 1], functions)
    _, answered, _ = react.build_react_conversation(messages, functions)
    turns = [*history, (question, answered[-1][1])]
    sample: dict[str, Any] = {"id": sample_id, "conversations": [
        turn for asked, reply in turns for turn in ({"from": "user", "value": asked},
                                                    {"from": "assistant", "value": reply})
    ]}
    if system != DEFAULT_SYSTEM_PROMPT:
        sample["system"] = system  # finetune.py gives every other sample the default system prompt
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=Path("example_func_call_train_samples.json"),
                        help="where to write the samples (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 1
    samples = [training_sample(messages, FUNCTIONS, f"function_call_{index}")
               for index, messages in enumerate(EXAMPLES)]
    args.output.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"Wrote {len(samples)} samples to {args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

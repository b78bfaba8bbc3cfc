"""Function calling against `openai_api.py` with the current OpenAI SDK: the `tools` API and the older `functions`.

Start a server first, e.g. `python openai_api.py -c Qwen-7B-Chat`, then:

    python examples/function_call_examples.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY] [--legacy]

The model decides when to call `get_weather`; this script runs the call locally, sends the result back, and prints
the model's final answer. `get_weather` here returns fixed numbers in place of a real weather service.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from openai import OpenAI

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def get_weather(city: str) -> dict[str, Any]:
    """Stands in for a weather service."""
    return {"temp_c": {"Paris": 21, "Beijing": 18}.get(city, 15)}


LOCAL_FUNCTIONS: dict[str, Callable[..., Any]] = {"get_weather": get_weather}


def call_local(name: str, arguments: str) -> str:
    """Run a function the model asked for; errors go back to the model as the result, so it can react to them."""
    if name not in LOCAL_FUNCTIONS:
        return json.dumps({"error": f"unknown function {name}"})
    try:
        return json.dumps(LOCAL_FUNCTIONS[name](**json.loads(arguments)))
    except (json.JSONDecodeError, TypeError) as error:
        return json.dumps({"error": f"bad arguments {arguments!r}: {error}"})


def chat_with_tools(client: OpenAI, model: str, question: str, max_rounds: int = 4) -> str:
    """The `tools` API: repeat until the model answers instead of calling a tool."""
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    messages: list[Any] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        message = client.chat.completions.create(model=model, messages=messages, tools=tools).choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message)
        for call in message.tool_calls:
            print(f"-> {call.function.name}({call.function.arguments})")
            result = call_local(call.function.name, call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise RuntimeError(f"no answer after {max_rounds} rounds of tool calls")


def chat_with_functions(client: OpenAI, model: str, question: str, max_rounds: int = 4) -> str:
    """The older `functions` API, as the original README's examples used it."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        message = client.chat.completions.create(
            model=model, messages=messages, functions=[WEATHER_TOOL]
        ).choices[0].message
        if message.function_call is None:
            return message.content or ""
        call = message.function_call
        print(f"-> {call.name}({call.arguments})")
        messages.append({"role": "assistant", "content": message.content,
                         "function_call": {"name": call.name, "arguments": call.arguments}})
        messages.append({"role": "function", "name": call.name, "content": call_local(call.name, call.arguments)})
    raise RuntimeError(f"no answer after {max_rounds} rounds of function calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default="qwen", help="the server's --model-name")
    parser.add_argument("--question", default="What is the weather in Paris?")
    parser.add_argument("--legacy", action="store_true", help="use `functions` instead of `tools`")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    chat = chat_with_functions if args.legacy else chat_with_tools
    print(chat(client, args.model, args.question))


if __name__ == "__main__":
    main()

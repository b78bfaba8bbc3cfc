"""The server as the original README used it: `python openai_api.py -c FOLDER`, no API key, and the pre-1.0 `openai`
client (0.28.1) asking for `model="Qwen"`, streamed and not, with `stop=[]`. Any model name is accepted by default;
`--strict-model-name` (the 404) is tested in test_server.py.

openai 0.28.1 cannot share an environment with the openai>=1 the rest of the suite uses, so a fixture installs it
with pip into a cache folder (once, from PyPI: 7 s here) and the client code runs in a subprocess that imports it
from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import WEATHER_ANSWER, WEATHER_ARGUMENTS, WEATHER_QUESTION, WEATHER_RESULT, WEATHER_TOOLS
from support import start_openai_api, stop

LEGACY_OPENAI = "openai==0.28.1"
SERVED_NAME = "qwen"  # openai_api.py's default --model-name; the original README's client asks for "Qwen"
MAX_NEW_TOKENS = 48  # more than the weather replies take

# The original README's client code, statement for statement; only the port differs (the fixture's server listens on
# a free one). A streamed reply printed piece by piece, then a plain reply printed with a newline.
README_CLIENT = """\
import openai
openai.api_base = "http://localhost:8000/v1"
openai.api_key = "none"

for chunk in openai.ChatCompletion.create(
    model="Qwen",
    messages=[
        {"role": "user", "content": "你好"}
    ],
    stream=True
):
    if hasattr(chunk.choices[0].delta, "content"):
        print(chunk.choices[0].delta.content, end="", flush=True)

response = openai.ChatCompletion.create(
    model="Qwen",
    messages=[
        {"role": "user", "content": "你好"}
    ],
    stream=False,
    stop=[]
)
print(response.choices[0].message.content)
"""


def legacy_openai_folder() -> Path:
    """Where the pip --target install of the old client is kept between runs: the user's cache folder, as
    `python -m qwen.vocab fetch` uses, one per Python version (aiohttp, one of its dependencies, is compiled)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache_home / "qwen" / f"{LEGACY_OPENAI.replace('==', '-')}-{sys.implementation.cache_tag}"


@pytest.fixture(scope="module")
def legacy_openai() -> dict[str, str]:
    """The environment in which `import openai` imports openai 0.28.1, installed on first use."""
    folder = legacy_openai_folder()
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Installed beside it, then renamed into place: an interrupted install, or another test run installing at
        # the same time, never leaves a half-filled folder behind under the name this fixture trusts.
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
                       "--target", str(staging), LEGACY_OPENAI]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                pytest.fail(f"pip did not install {LEGACY_OPENAI} within 10 minutes; this test needs PyPI once.",
                            pytrace=False)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["(no output)"]
                pytest.fail(f"pip could not install {LEGACY_OPENAI} (this test needs PyPI once, then keeps it in "
                            f"{folder}): {errors[-1]}", pytrace=False)
            try:
                staging.rename(folder)
            except OSError:
                if not folder.is_dir():  # anything but another run having put its own install in place first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    version = subprocess.run([sys.executable, "-c", "import openai; print(openai.version.VERSION)"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == LEGACY_OPENAI.split("==")[1], (
        f"{folder} does not give {LEGACY_OPENAI}; delete it to reinstall.\n{version.stderr[-2000:]}")
    return env


@pytest.fixture(scope="module")
def greedy_chat_dir(tool_chat_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint trained on the weather conversation (conftest.py), with a greedy, short generation config:
    the old client's calls set no sampling fields, and a deterministic reply lets them be compared with the current
    client's."""
    folder = tmp_path_factory.mktemp("greedy-chat") / "checkpoint"
    shutil.copytree(tool_chat_dir, folder)
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(greedy_chat_dir, tmp_path_factory):
    """openai_api.py with its defaults, as the original README ran it: no API key, no --model-name."""
    process, base = start_openai_api(greedy_chat_dir, tmp_path_factory.mktemp("legacy-server") / "server.log")
    yield base
    stop(process)


@pytest.fixture()
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def ask(client: OpenAI, model: str) -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "你好"}]
                                          ).choices[0].message.content


def test_the_original_readme_client_runs_unchanged_on_openai_0_28(legacy_openai, server, client):
    expected = ask(client, SERVED_NAME)
    assert expected, "the greedy reply is empty: the comparison below would prove little"
    code = README_CLIENT.replace("localhost:8000", f"localhost:{server.rsplit(':', 1)[1]}")
    result = subprocess.run([sys.executable, "-c", code], env=legacy_openai, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    streamed, plain = result.stdout[:len(expected)], result.stdout[len(expected):]
    assert streamed == expected, result.stdout  # every piece printed, and nothing else (no "None", no markers)
    assert plain == expected + "\n", result.stdout


# The original function-calling example's way of using the old client: `functions` in OpenAI's legacy form, the
# assistant's `function_call` and the `function` message sent back. Prints the call, then the final answer.
LEGACY_FUNCTION_CALLING = """\
import json
import sys

import openai
openai.api_base = sys.argv[1]
openai.api_key = "none"
functions = json.loads(sys.argv[2])

messages = [{"role": "user", "content": sys.argv[3]}]
reply = openai.ChatCompletion.create(model="Qwen", messages=messages, functions=functions)
choice = reply.choices[0]
call = choice.message["function_call"]
print(choice.finish_reason, call.name, call.arguments, sep="\\n")
messages.append({"role": "assistant", "content": choice.message.content,
                 "function_call": {"name": call.name, "arguments": call.arguments}})
messages.append({"role": "function", "name": call.name, "content": sys.argv[4]})
final = openai.ChatCompletion.create(model="Qwen", messages=messages, functions=functions)
print(final.choices[0].finish_reason, final.choices[0].message.content, sep="\\n")
"""


def test_function_calling_with_openai_0_28(legacy_openai, server):
    functions = [tool["function"] for tool in WEATHER_TOOLS]
    command = [sys.executable, "-c", LEGACY_FUNCTION_CALLING, f"{server}/v1", json.dumps(functions),
               WEATHER_QUESTION, WEATHER_RESULT]
    result = subprocess.run(command, env=legacy_openai, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["function_call", "get_weather", WEATHER_ARGUMENTS, "stop", WEATHER_ANSWER]


def test_any_model_name_is_accepted_and_reported_back(server, client):
    """As the original server and vLLM do, a reply reports the model name its request gave; /v1/models lists the
    server's own."""
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    expected = ask(client, SERVED_NAME)
    messages = [{"role": "user", "content": "你好"}]
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages)
    assert (reply.model, reply.choices[0].message.content) == ("gpt-3.5-turbo", expected)
    chunks = list(client.chat.completions.create(model="Qwen", messages=messages, stream=True))
    assert {chunk.model for chunk in chunks} == {"Qwen"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    completion = client.completions.create(model="text-davinci-003", prompt="你好", max_tokens=2)
    assert completion.model == "text-davinci-003" and completion.choices[0].text
    # Without a model the reply names the server's; so does an empty name.
    for body in ({}, {"model": ""}):
        response = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, **body}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == SERVED_NAME


@pytest.mark.parametrize("stop_field", [[], None], ids=["empty-list", "null"])
def test_stop_as_an_empty_list_or_null_means_no_stop_strings(server, client, stop_field):
    expected = ask(client, SERVED_NAME)
    body = {"model": "Qwen", "messages": [{"role": "user", "content": "你好"}], "stop": stop_field}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected


def test_a_model_name_too_long_to_repeat_in_every_chunk_is_refused(server):
    body = {"model": "q" * 1025, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"

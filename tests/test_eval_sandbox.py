"""The HumanEval sandbox: programs that pass, fail, hang, or try to get out, run in a separate process and are stopped.

Escape attempts are checked twice where the machine allows: with the namespaces (the default) and with the Python
guard alone (what a machine without user namespaces gets), so neither layer hides a hole in the other. Each check
looks at the world outside (a listening socket that must stay silent, a file that must not appear), not only at
the program's exit status.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from evalkit.data import read_humaneval  # noqa: E402
from evalkit.sandbox import Sandbox, describe, namespaces_available, run_many, run_python  # noqa: E402
from evalkit.scoring import chat_code_completion, humaneval_program  # noqa: E402

HUMANEVAL = Path(__file__).parent / "fixtures" / "eval" / "humaneval"
LAYERS = [pytest.param(None, id="all-layers"), pytest.param(False, id="python-guard-only")]


def test_passing_and_failing_programs():
    assert run_python("assert sum([1, 2]) == 3\nprint('ok')").status == "passed"
    failed = run_python("def f():\n    return 2\n\nassert f() == 3, 'f is wrong'\n")
    assert (failed.status, failed.detail) == ("failed", "AssertionError: f is wrong")
    syntax = run_python("def f(:\n")
    assert syntax.status == "failed" and syntax.detail.startswith("SyntaxError")


def test_programs_run_in_another_process_with_a_stripped_environment(monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_SECRET", "do-not-leak")
    result = run_python("import os, sys\nprint(os.getpid(), sorted(os.environ))\n"
                        "assert 'QWEN_EVAL_SECRET' not in os.environ\n"
                        "assert not any('site-packages' in p for p in sys.path)")
    assert result.status == "passed", result.output
    assert int(result.output.split()[0]) != os.getpid()


def test_a_solutions_main_block_does_not_run():
    # As in the HumanEval harness: a demo under `if __name__ == "__main__":` (here one that waits for input) is skipped.
    assert run_python("def f():\n    return 1\n\nif __name__ == '__main__':\n    input()\n    raise SystemExit(1)\n"
                      "assert f() == 1").status == "passed"


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"],
                         ids=["busy-loop", "sleep"])
def test_programs_that_never_end_are_stopped(program):
    start = time.monotonic()
    result = run_python(program, Sandbox(timeout=1))
    assert result.status == "timed out"
    assert time.monotonic() - start < 10


def test_memory_and_output_are_limited():
    hog = run_python("block = bytearray(8 * 1024 ** 3)", Sandbox(memory_mb=512))
    assert (hog.status, hog.detail) == ("failed", "MemoryError")
    flood = run_python("print('x' * 10 ** 8)", Sandbox(file_size_mb=1))
    assert flood.status == "failed" and "file size limit" in flood.detail


@pytest.mark.parametrize("namespaces", LAYERS)
def test_network_is_unreachable(namespaces):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'leak')",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ]
        for program in attempts:
            result = run_python(program, Sandbox(namespaces=namespaces))
            assert result.status == "failed", program
        with pytest.raises(TimeoutError):
            listener.accept()


@pytest.mark.parametrize("namespaces", LAYERS)
def test_files_outside_the_working_folder_cannot_be_written(tmp_path, namespaces):
    target = tmp_path / "escaped.txt"
    kept = tmp_path / "kept.txt"
    kept.write_text("precious")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import io\nio.FileIO({str(target)!r}, 'w')",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'a')",
        f"import os\nos.remove({str(kept)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.symlink({str(kept)!r}, 'link')\nopen('link', 'w').write('x')",
    ]
    for program in attempts:
        result = run_python(program, Sandbox(namespaces=namespaces))
        assert result.status == "failed", program
        assert "PermissionError" in result.detail, (program, result.output)
    assert not target.exists()
    assert kept.read_text() == "precious"
    # Its own folder is writable (some solutions use a scratch file), and is deleted afterwards.
    inside = run_python("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
                        "import os\nprint(os.getcwd())", Sandbox(namespaces=namespaces))
    assert inside.status == "passed", inside.output
    assert not Path(inside.output.strip()).exists()


@pytest.mark.parametrize("namespaces", LAYERS)
def test_no_new_processes(tmp_path, namespaces):
    marker = tmp_path / "spawned"
    attempts = [
        "import os\nif os.fork() == 0:\n    open({m!r}, 'w')",
        "import subprocess\nsubprocess.run(['touch', {m!r}])",
        "import os\nos.system('touch {m}')",
        "import os\nos.posix_spawn('/usr/bin/touch', ['touch', {m!r}], {{}})",
        "import importlib, os\nimportlib.reload(os)\nos.system('touch {m}')",
        "import multiprocessing",
        "import ctypes\nctypes.CDLL(None).fork()",
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",
    ]
    for template in attempts:
        result = run_python(template.format(m=str(marker)), Sandbox(namespaces=namespaces))
        assert result.status == "failed", template
        assert ("PermissionError" in result.detail or "ImportError" in result.detail), (template, result.output)
    time.sleep(0.2)
    assert not marker.exists()


@pytest.mark.skipif(not namespaces_available(), reason="unshare cannot create user namespaces on this machine")
def test_namespaces_leave_no_network_and_no_other_processes():
    # What the namespaces give even code that got past the Python guard: only a loopback device, which is down,
    # and a process table holding the program alone.
    program = ("import os\ndevices = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
               "assert devices == ['lo'], devices\nassert os.getpid() == 1, os.getpid()\n")
    result = run_python(program, Sandbox(namespaces=True))
    assert result.status == "passed", result.output
    assert "network namespace" in describe(Sandbox())["network"]


def test_fixture_tasks_pass_with_their_solutions_and_fail_without():
    tasks = read_humaneval(HUMANEVAL)
    solved = run_many([humaneval_program(t.prompt, t.canonical_solution, t.test, t.entry_point) for t in tasks])
    assert [r.status for r in solved] == ["passed"] * len(tasks), [r.output for r in solved]
    stubs = run_many([humaneval_program(t.prompt, "    return None\n", t.test, t.entry_point) for t in tasks])
    assert [r.status for r in stubs] == ["failed"] * len(tasks)


def test_chat_answers_run_as_the_published_program():
    task = next(t for t in read_humaneval(HUMANEVAL) if t.entry_point == "digit_sum")
    replies = {
        # A full definition with a helper and an import of its own.
        "```python\nimport math\n\ndef _digits(n):\n    return str(abs(n))\n\ndef digit_sum(n: int) -> int:\n"
        "    return sum(int(d) for d in _digits(n))\n```": "passed",
        # Only the body, unindented.
        "```python\nreturn sum(int(d) for d in str(abs(n)))\n```": "passed",
        # Plausible but wrong: negative numbers are not handled.
        "```python\ndef digit_sum(n):\n    return sum(int(d) for d in str(n))\n```": "failed",
    }
    for reply, status in replies.items():
        program = humaneval_program(task.prompt, chat_code_completion(reply, task.entry_point), task.test,
                                    task.entry_point)
        assert run_python(program).status == status, reply

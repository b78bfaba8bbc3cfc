"""The HumanEval sandbox: real programs in real bubblewrap, escaping, cheating, hogging, and passing.

The escapes first undo the in-process guard, as model code can (re-importing `posix`, `_io` or `_socket`, or removing
its import hook), so what they meet is the operating-system boundary. Each check looks at the world outside as well
as at the status: a listening socket that must stay silent, files that must neither appear nor disappear, a sibling
process that must survive. Every attack is written so that it would pass if it got through. Programs that can run
together run through `run_many`, as the evaluator runs them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from evalkit.data import read_humaneval  # noqa: E402
from evalkit.sandbox import (  # noqa: E402
    SANDBOX_ENV,
    Sandbox,
    SandboxUnavailable,
    describe,
    run_many,
    run_python,
)
from evalkit.scoring import chat_code_completion, humaneval_program  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HUMANEVAL = Path(__file__).parent / "fixtures" / "eval" / "humaneval"
# Where bubblewrap is not to be found, with the unsafe flag: what a machine without it may still get.
UNISOLATED = Sandbox(bwrap="no-such-bwrap", allow_unisolated=True)

FRESH_POSIX = "import sys\ndel sys.modules['posix']\nimport posix  # a new copy, without the guard's changes\n"
FRESH_IO = "import sys\ndel sys.modules['_io']\nimport _io\n"
FRESH_SOCKET = "import sys\ndel sys.modules['_socket']\nimport _socket\n"
FRESH_SOCKET_MODULE = "import sys\ndel sys.modules['socket'], sys.modules['_socket']\nimport socket\n"
NO_IMPORT_HOOK = "import sys\nsys.meta_path.pop(0)  # the guard's import blocker\n"


def statuses(programs: list[str], sandbox: Sandbox = Sandbox()) -> dict[str, tuple[str, str]]:
    return {program: (result.status, result.detail)
            for program, result in zip(programs, run_many(programs, sandbox), strict=True)}


def test_passing_and_failing_programs():
    assert run_python("assert sum([1, 2]) == 3\nprint('ok')").status == "passed"
    failed = run_python("def f():\n    return 2\n\nassert f() == 3, 'f is wrong'\n")
    assert (failed.status, failed.detail) == ("failed", "AssertionError: f is wrong")
    syntax = run_python("def f(:\n")
    assert syntax.status == "failed" and syntax.detail.startswith("SyntaxError")


def test_programs_run_in_another_process_with_a_stripped_environment(monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_SECRET", "do-not-leak")
    result = run_python("import os, sys\nprint(os.getpid(), sorted(os.environ))\n"
                        f"assert set(os.environ) - {{'PWD'}} == {set(SANDBOX_ENV)}, os.environ\n"  # bwrap sets PWD
                        "assert not any('site-packages' in p for p in sys.path)")
    assert result.status == "passed", result.output
    assert int(result.output.split()[0]) != os.getpid()


def test_a_solutions_main_block_does_not_run():
    # As in the HumanEval harness: a demo under `if __name__ == "__main__":` (here one that waits for input) is skipped.
    assert run_python("def f():\n    return 1\n\nif __name__ == '__main__':\n    input()\n    raise SystemExit(1)\n"
                      "assert f() == 1").status == "passed"


def test_programs_that_never_end_are_stopped():
    start = time.monotonic()
    results = run_many(["while True:\n    pass\n", "import time\ntime.sleep(60)\n"], Sandbox(timeout=1))
    assert [r.status for r in results] == ["timed out", "timed out"]
    assert time.monotonic() - start < 10


def test_memory_output_and_scratch_space_are_limited():
    hog, flood, filler = run_many([
        "block = bytearray(8 * 1024 ** 3)",
        "print('x' * 10 ** 8)",
        # 1 MiB files (the largest it may write) into its private /tmp until that 4 MiB tmpfs is full.
        "for n in range(100):\n    open(f'/tmp/{n}', 'wb').write(bytes(1024 * 1024))",
    ], Sandbox(memory_mb=512, file_size_mb=1, tmp_mb=4))
    assert (hog.status, hog.detail) == ("failed", "MemoryError")
    assert flood.status == "failed" and "file size limit" in flood.detail
    assert filler.status == "failed" and "No space left on device" in filler.detail, filler.output


# --------------------------------------------------------------------------------------------------------------------
# Scoring: only the harness's own confirmation that the tests ran to the end counts
# --------------------------------------------------------------------------------------------------------------------

WRONG = "    return None\n"
CHEATS = {
    "sys.exit(0) before the tests": WRONG + "\nimport sys\nsys.exit(0)\n",
    "raise SystemExit before the tests": WRONG + "\nraise SystemExit\n",
    "os._exit(0) before the tests": WRONG + "\nimport os\nos._exit(0)\n",
    "os._exit(0) from the function under test": "    import os\n    os._exit(0)\n",
    "sys.exit(0) from the function under test": "    import sys\n    sys.exit(0)\n",
    "atexit hook calling os._exit(0) after a failed assert":
        WRONG + "\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "exit status 0 from an excepthook": WRONG + "\nimport os, sys\nsys.excepthook = lambda *exc: os._exit(0)\n",
    "writing to every descriptor, then os._exit(0)":
        WRONG + "\nimport os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'0' * 32)\n"
                "    except OSError:\n        pass\nos._exit(0)\n",
}


@pytest.mark.parametrize("sandbox", [Sandbox(), UNISOLATED], ids=["bubblewrap", "unisolated"])
def test_exit_status_cannot_turn_failed_tests_into_a_pass(sandbox):
    task = read_humaneval(HUMANEVAL)[0]
    programs = [humaneval_program(task.prompt, completion, task.test, task.entry_point)
                for completion in [task.canonical_solution, *CHEATS.values()]]
    results = run_many(programs, sandbox)
    assert results[0].status == "passed", results[0].output  # the right answer still passes
    for cheat, result in zip(CHEATS, results[1:], strict=True):
        assert result.status == "failed", (cheat, result)
    assert results[1].detail == "SystemExit(0): the program ended itself before its tests ran to the end"
    assert results[3].detail == "ended itself (exit status 0) before its tests ran to the end"
    assert results[6].detail == "AssertionError"  # the atexit hook never ran: the guard ended the process first


# --------------------------------------------------------------------------------------------------------------------
# The operating-system boundary: bubblewrap
# --------------------------------------------------------------------------------------------------------------------


def test_host_files_cannot_be_written_deleted_executed_or_read(tmp_path):
    target, kept, marker = tmp_path / "escaped.txt", tmp_path / "kept.txt", tmp_path / "spawned"
    kept.write_text("precious")
    system_file = Path(f"/usr/qwen-eval-escape-{os.getpid()}")
    secret = tmp_path / "secret.txt"
    secret.write_text("evaluator's secret")
    home = Path.home()
    # The only entries of the evaluator's home the sandbox may show: the way to the interpreter, when it lives there.
    interpreter = Path(os.path.realpath(sys.base_prefix))
    allowed = {interpreter.relative_to(home).parts[0]} if interpreter.is_relative_to(home) else set()
    assert set(os.listdir(home)) - allowed, "the home folder has nothing else to hide: the check below is empty"
    programs = [
        f"{FRESH_IO}_io.open({str(target)!r}, 'w').write('x')",
        f"{FRESH_POSIX}posix.close(posix.open({str(target)!r}, posix.O_CREAT | posix.O_WRONLY))",
        f"{FRESH_POSIX}posix.unlink({str(kept)!r})",
        f"{FRESH_POSIX}posix.execv('/usr/bin/touch', ['touch', {str(marker)!r}])",
        f"{NO_IMPORT_HOOK}import ctypes\nassert ctypes.CDLL(None).creat({str(target).encode()!r}, 0o644) >= 0",
        f"{FRESH_IO}_io.open({str(system_file)!r}, 'w')",  # the system itself is read-only
        "print(open('/etc/passwd').read())",
        f"print(open({str(secret)!r}).read())",
        f"import os\nassert os.path.exists({str(ROOT / 'eval' / 'evalkit' / 'sandbox.py')!r})",
        f"import os\nentries = set(os.listdir({str(home)!r}))\nprint(sorted(entries))\n"
        f"assert entries - {allowed!r}, 'nothing of the home folder is visible'",
    ]
    try:
        for program, (status, detail) in statuses(programs).items():
            assert status == "failed", program
        assert not target.exists() and not marker.exists() and not system_file.exists()
        assert kept.read_text() == "precious"
    finally:
        system_file.unlink(missing_ok=True)


def test_network_of_the_host_is_unreachable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        programs = [
            f"{FRESH_SOCKET}s = _socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'leak')",
            f"{FRESH_SOCKET_MODULE}socket.create_connection(('127.0.0.1', {port})).sendall(b'leak')",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'leak')",
        ]
        for program, (status, detail) in statuses(programs).items():
            assert status == "failed", program
        with pytest.raises(TimeoutError):
            listener.accept()


def test_processes_cannot_be_seen_signalled_or_multiplied():
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        programs = [
            f"{FRESH_POSIX}import signal\nposix.kill({sibling.pid}, signal.SIGKILL)",
            # Signal 0 only asks whether the evaluator could be signalled, without harming it if it could.
            f"{FRESH_POSIX}posix.kill({os.getpid()}, 0)",
            f"{FRESH_POSIX}import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) > 2, 'alone'",
            f"{FRESH_POSIX}pid = posix.fork()\nif pid == 0:\n    posix._exit(0)\nposix.waitpid(pid, 0)",
            "import threading\nthreading.Thread(target=print).start()",
        ]
        for program, (status, detail) in statuses(programs).items():
            assert status == "failed", (program, detail)
        # A fork bomb: every child forks too; it says whether any fork succeeded before the timeout ends it.
        bomb = run_python(f"{FRESH_POSIX}refused = 0\nwhile True:\n    try:\n        pid = posix.fork()\n"
                          "    except BlockingIOError:\n        refused += 1\n        if refused == 100:\n"
                          "            print('refused', flush=True)\n        continue\n    print('forked', flush=True)\n",
                          Sandbox(timeout=2))
        assert bomb.status == "timed out" and "refused" in bomb.output and "forked" not in bomb.output, bomb
        assert sibling.poll() is None, "the sandbox killed a process outside it"
    finally:
        sibling.kill()
        sibling.wait()


def test_describe_states_what_the_probe_measured():
    facts = describe(Sandbox(tmp_mb=8))
    assert facts["isolated"] is True and facts["isolation"].startswith("bubblewrap ")
    assert os.path.realpath(sys.base_prefix) in facts["filesystem"] and "8 MiB tmpfs" in facts["filesystem"]
    assert {"usr", "tmp", "proc", "dev"} <= set(facts["root_listing"])
    assert not {"etc", "home", "work", "var", "run", "srv", "opt"} & set(facts["root_listing"])
    inside, outside = facts["user"].removeprefix("uid ").split(" without capabilities inside, uid ")
    assert inside == "65534" and outside.removesuffix(" outside") != "0"
    assert "RLIMIT_NPROC 0, checked to bind" in facts["processes"]
    assert "not a boundary" in facts["python_guard"]


# --------------------------------------------------------------------------------------------------------------------
# Without bubblewrap
# --------------------------------------------------------------------------------------------------------------------


def test_without_bubblewrap_nothing_runs_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    with pytest.raises(SandboxUnavailable) as missing:
        run_python("assert True", Sandbox())
    message = str(missing.value)
    assert "\n" not in message
    assert message.startswith("cannot isolate model-written programs: 'bwrap' is not installed.")
    assert "apt-get install bubblewrap" in message and "--allow-unsafe-execution" in message
    monkeypatch.undo()
    # An isolation tool that fails to create its namespaces (here one that always fails) is refused the same way.
    with pytest.raises(SandboxUnavailable, match=r"^cannot isolate model-written programs: .*false.*status 1\. "
                                                 r"Install bubblewrap \(apt-get install bubblewrap\)"):
        run_many(["assert True"], Sandbox(bwrap="false"))
    assert [r.status for r in run_many(["assert True", "assert False"], UNISOLATED)] == ["passed", "failed"]
    facts = describe(UNISOLATED)
    assert facts["isolated"] is False and facts["isolation"].startswith("NONE (--allow-unsafe-execution)")


@pytest.mark.parametrize("sandbox", [UNISOLATED, Sandbox()], ids=["unisolated", "bubblewrap"])
def test_the_in_process_guard_refuses_casual_escapes(tmp_path, sandbox):
    # The extra layer, all there is without bubblewrap: what plain code tries is refused with PermissionError or
    # ImportError, before it reaches the operating system. Inside bubblewrap the same attempts fail either way.
    target, kept, marker = tmp_path / "escaped.txt", tmp_path / "kept.txt", tmp_path / "spawned"
    kept.write_text("precious")
    programs = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.remove({str(kept)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        f"import os\nos.system('touch {marker}')",
        f"import importlib, os\nimportlib.reload(os)\nos.system('touch {marker}')",
        "import multiprocessing",
        "import ctypes",
        f"import os, signal\nos.kill({os.getpid()}, 0)",
        "import socket\nsocket.getaddrinfo('localhost', 80)",
    ]
    for program, (status, detail) in statuses(programs, sandbox).items():
        assert status == "failed", program
        if sandbox.allow_unisolated:
            assert "PermissionError" in detail or "ImportError" in detail, (program, detail)
    assert not target.exists() and not marker.exists() and kept.read_text() == "precious"
    # Its own folder is writable (some solutions use a scratch file).
    inside = run_python("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'", sandbox)
    assert inside.status == "passed", inside.output


# --------------------------------------------------------------------------------------------------------------------
# HumanEval programs
# --------------------------------------------------------------------------------------------------------------------


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
    programs = [humaneval_program(task.prompt, chat_code_completion(reply, task.entry_point), task.test,
                                  task.entry_point) for reply in replies]
    assert [r.status for r in run_many(programs)] == list(replies.values())

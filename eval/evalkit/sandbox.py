"""Running model-written programs away from the evaluator.

Each program runs in a new Python process, never in the evaluator's own, with:

- a fresh empty working folder (deleted afterwards) that is also its HOME and TMPDIR, and an environment holding only
  PATH, HOME, TMPDIR and LANG, so no credentials or settings of the evaluator's environment reach it;
- `python -I -S -B`: isolated mode (no PYTHON* variables, no user site), no site-packages (HumanEval needs only the
  standard library), no bytecode files written;
- rlimits set in `preexec_fn` before the interpreter starts: CPU seconds (timeout + 1), address space
  (`memory_mb`), largest file it may write (`file_size_mb`, its captured output included), no core dumps; and
  RLIMIT_NPROC 0 set by the guard, so it cannot fork (the kernel exempts root from this one);
- a wall-clock timeout, after which its whole process group is killed;
- where Linux allows it (`unshare -rnp` works: user namespaces enabled), new user, network and PID namespaces: the
  program sees no network interface at all, not even loopback, and cannot see or signal any process outside;
- `sandbox_guard.py`, run before the program, which refuses sockets, new processes, signals, writes outside the
  working folder and ctypes-like imports at the Python level (its docstring has the list).

This is a sandbox against accidents and casual escapes of generated code, not a security boundary against code
written to attack the machine: for that, run the evaluation inside a container or VM. `describe()` reports what was
in force, and the HumanEval results file records it.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

GUARD_SOURCE = (Path(__file__).parent / "sandbox_guard.py").read_text(encoding="utf-8")
NAMESPACE_COMMAND = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
OUTPUT_TAIL = 2000  # characters of the program's output kept for the results file

Status = Literal["passed", "failed", "timed out"]


@dataclass(frozen=True)
class Sandbox:
    """Limits for one program. `namespaces`: None uses them when available, True requires them, False skips them."""

    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    file_size_mb: int = 1  # largest file the program may write, its output included
    namespaces: bool | None = None


@dataclass(frozen=True)
class ExecutionResult:
    status: Status
    detail: str  # why it failed: the last line of its error, or the limit it hit; "" when it passed
    output: str  # the last OUTPUT_TAIL characters of its stdout and stderr


@cache
def namespaces_available() -> bool:
    """Whether `unshare` can give a child its own user, network and PID namespaces on this machine."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run([*NAMESPACE_COMMAND, sys.executable, "-I", "-S", "-c", "pass"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _use_namespaces(sandbox: Sandbox) -> bool:
    if sandbox.namespaces is False:
        return False
    available = namespaces_available()
    if sandbox.namespaces and not available:
        raise RuntimeError("Namespaces were required for the sandbox, but `unshare --user --net --pid` does not work "
                           "here (no unshare, or unprivileged user namespaces are disabled).")
    return available


def describe(sandbox: Sandbox) -> dict[str, Any]:
    """What the sandbox enforces on this machine, for the results file."""
    namespaces = _use_namespaces(sandbox)
    root = os.geteuid() == 0
    return {
        "process": "a separate `python -I -S -B` process per program, in a fresh empty folder, environment stripped",
        "timeout_s": sandbox.timeout,
        "cpu_s": _cpu_seconds(sandbox),
        "memory_mb": sandbox.memory_mb,
        "file_size_mb": sandbox.file_size_mb,
        "network": ("own network namespace without interfaces; socket functions removed" if namespaces
                    else "socket functions removed (no network namespace: unshare unavailable)"),
        "processes": ("own PID namespace; " if namespaces else "")
                     + ("fork/exec/spawn/kill removed (RLIMIT_NPROC does not bind root)" if root
                        else "RLIMIT_NPROC=0; fork/exec/spawn/kill removed"),
        "files": "writes outside the working folder refused; file size limited",
    }


def _cpu_seconds(sandbox: Sandbox) -> int:
    return math.ceil(sandbox.timeout) + 1


def _limit_resources(sandbox: Sandbox) -> Callable[[], None]:
    """The `preexec_fn`: runs in the child between fork and exec, so the limits bind from the first instruction."""
    cpu = _cpu_seconds(sandbox)
    memory = sandbox.memory_mb * 1024 * 1024
    file_size = sandbox.file_size_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


_SIGNALS = {
    signal.SIGXCPU: "CPU time limit reached",
    signal.SIGXFSZ: "file size limit reached (too much output?)",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "crashed (segmentation fault)",
}


def _failure_detail(returncode: int, output: str) -> str:
    if returncode < 0:
        return _SIGNALS.get(-returncode, f"killed by signal {-returncode}")
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit status {returncode}"


def run_python(source: str, sandbox: Sandbox = Sandbox()) -> ExecutionResult:
    """Run `source` as a Python program in the sandbox; it passes when it exits with status 0 in time."""
    workdir = Path(tempfile.mkdtemp(prefix="qwen-eval-"))
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        command = [sys.executable, "-I", "-S", "-B", "-c", GUARD_SOURCE, "program.py"]
        if _use_namespaces(sandbox):
            command = [*NAMESPACE_COMMAND, *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        # Output goes to a file outside the program's folder: the file size limit then caps it too, and a pipe
        # could not fill up and stall the program.
        with tempfile.TemporaryFile() as output_file:
            process = subprocess.Popen(
                command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output_file, stderr=subprocess.STDOUT,
                preexec_fn=_limit_resources(sandbox), start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                returncode = process.wait(timeout=sandbox.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = -signal.SIGKILL
            finally:
                try:  # the whole group: the namespace's child, and anything it might have started
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
            output_file.seek(0, os.SEEK_END)
            size = output_file.tell()
            output_file.seek(max(0, size - 4 * OUTPUT_TAIL))
            output = output_file.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if timed_out:
        return ExecutionResult("timed out", f"no result within {sandbox.timeout:g} s", output)
    if returncode == 0:
        return ExecutionResult("passed", "", output)
    if size >= sandbox.file_size_mb * 1024 * 1024:  # Python ignores SIGXFSZ: its writes fail and it exits
        return ExecutionResult("failed", "file size limit reached (too much output?)", output)
    return ExecutionResult("failed", _failure_detail(returncode, output), output)


def run_many(
    sources: Sequence[str],
    sandbox: Sandbox = Sandbox(),
    workers: int | None = None,
    on_done: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """`run_python` for each source, `workers` at a time (default: one per CPU); results in the order given."""
    workers = workers or os.cpu_count() or 1
    results: list[ExecutionResult | None] = [None] * len(sources)

    def run(index: int) -> None:
        results[index] = run_python(sources[index], sandbox)
        if on_done is not None:
            on_done(index, results[index])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, index) for index in range(len(sources))]:
            future.result()
    return [result for result in results if result is not None]

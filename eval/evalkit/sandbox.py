"""Running model-written programs away from the evaluator.

The boundary is bubblewrap (`bwrap`, Debian's `bubblewrap` package). Each program runs in a new `python -I -S -B`
process that bubblewrap puts in namespaces of its own:

- files: a new root holding only read-only views of /usr, /bin, /lib* and the interpreter's installation, a minimal
  read-only /dev, its own /proc, and a private tmpfs of `tmp_mb` MiB at /tmp, its working folder, HOME and TMPDIR.
  Nothing else of the host exists for it: no /etc, no home folders (the interpreter's own folder aside, when it is
  installed in one), no /work, no host /tmp, none of the evaluator's files;
- user: uid and gid 65534 without capabilities, which outside is uid 65534 too (when the evaluator runs as root) or
  the evaluator's own uid, never root. The kernel exempts root from RLIMIT_NPROC, including a namespace's user that
  is root outside; here it binds, and `sandbox_guard.py` sets it to 0 before the program's first line, so the
  program can start neither processes nor threads (the probe below checks that a fork is refused);
- PID: it sees only itself and bubblewrap's init, so it cannot signal the evaluator or any other process, and
  whatever is left in the namespace dies with it;
- network: only its own loopback device; nothing of the host, 127.0.0.1 included, can be reached;
- IPC, UTS and cgroup namespaces of its own; an empty environment but PATH, HOME, TMPDIR and LANG;
  `--die-with-parent`, and `--new-session` so that it cannot push input into the evaluator's terminal.

From the evaluator, inherited through bubblewrap: rlimits on CPU seconds, address space, the size of any file it
writes (its captured output included) and core dumps; and a wall-clock timeout, after which its process group is
killed.

A program passes only when `sandbox_guard.py` confirms that its last line, the tests' `check(...)`, returned: the
guard then writes a per-run random token to a pipe and ends the process. Exit statuses do not count, so `sys.exit(0)`,
`os._exit(0)` or an atexit hook cannot make failed tests pass.

When the evaluator runs as root, bubblewrap runs as uid 65534, joining a user namespace made for it once per
evaluator process (`_nobody_user_namespace`): bubblewrap mounts with the capabilities of that namespace's owner, and
those reach files owned by root only if root's uid is mapped in it, which the interpreter needs when it is installed
under root's home (pyenv puts it in /root/.pyenv). No process of the sandbox is root in that namespace, or can become
it: bubblewrap drops every capability and sets no_new_privs before the program starts.

Where bubblewrap is missing, or cannot create the namespaces, nothing runs: `SandboxUnavailable` says so in one line
naming the fix, unless `allow_unisolated` (the scripts' `--allow-unsafe-execution`) is set. Programs then run as they
did before bubblewrap: as the evaluator's user, in a fresh temporary folder, with the rlimits and the in-process guard
only, which model code can undo (it can then read and write the evaluator's files, reach the network and signal its
processes). `describe()` says which of the two is in force, with what the probe measured; the HumanEval results file
records it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

GUARD_SOURCE = (Path(__file__).parent / "sandbox_guard.py").read_text(encoding="utf-8")
OUTPUT_TAIL = 2000  # characters of the program's output kept for the results file
NOBODY = 65534  # the sandbox's uid and gid inside, and outside when the evaluator is root
SANDBOX_FOLDER = "/tmp"  # inside the sandbox: the private tmpfs, its working folder
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": SANDBOX_FOLDER, "TMPDIR": SANDBOX_FOLDER, "LANG": "C.UTF-8"}
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
UNSAFE_FLAG = "--allow-unsafe-execution"

Status = Literal["passed", "failed", "timed out"]


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot isolate programs on this machine and unisolated execution was not allowed. One line."""


@dataclass(frozen=True)
class Sandbox:
    """Limits for one program, and what may happen where bubblewrap cannot isolate it."""

    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    file_size_mb: int = 1  # largest file the program may write, its output included
    tmp_mb: int = 16  # the private writable /tmp inside bubblewrap
    allow_unisolated: bool = False  # without bubblewrap: run with the rlimits and the in-process guard only
    bwrap: str = "bwrap"  # the bubblewrap executable: a name looked up in PATH, or a path


@dataclass(frozen=True)
class ExecutionResult:
    status: Status
    detail: str  # why it failed: the last line of its error, or the limit it hit; "" when it passed
    output: str  # the last OUTPUT_TAIL characters of its stdout and stderr


@dataclass(frozen=True)
class Isolation:
    """How programs run on this machine: with `bwrap` (its path), or without isolation because of `problem`."""

    bwrap: str | None
    problem: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # measured inside the sandbox by the probe
    userns_fd: int | None = None  # the namespace bubblewrap joins when the evaluator is root


# --------------------------------------------------------------------------------------------------------------------
# Finding out whether bubblewrap isolates programs here
# --------------------------------------------------------------------------------------------------------------------

# Runs inside the sandbox once per evaluator process: what `describe()` reports is what this measured.
_PROBE = r"""
import json, os, resource
capabilities = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff:"))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
try:
    pid = os.fork()
except BlockingIOError:
    fork = "refused"
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    fork = "allowed"
print(json.dumps({"uid": os.getuid(), "capabilities": int(capabilities, 16), "fork": fork,
                  "root": sorted(os.listdir("/"))}))
"""

_lock = threading.Lock()
_probed: dict[str, Isolation] = {}
_userns: tuple[int | None, str] | None = None


def _interpreter() -> tuple[str, list[str]]:
    """The interpreter's executable, and the folders outside the system paths that it needs: its installation."""
    executable = os.path.realpath(sys.executable)
    base = os.path.join(sys.base_exec_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    if not executable.startswith(os.path.realpath(sys.base_exec_prefix) + "/") and os.path.isfile(base):
        executable = os.path.realpath(base)  # a virtual environment's copied binary: run the one it was made from
    needed: list[str] = []
    for folder in sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                                         os.path.dirname(executable))}):
        if not any(folder == bound or folder.startswith(bound.rstrip("/") + "/") for bound in (*SYSTEM_PATHS, *needed)):
            needed.append(folder)
    return executable, needed


def _visible_paths() -> list[str]:
    """The host paths the sandbox sees, all read-only."""
    return [path for path in SYSTEM_PATHS if os.path.isdir(path) or os.path.islink(path)] + _interpreter()[1]


def _bwrap_command(bwrap: str, userns_fd: int | None, sandbox: Sandbox, argv: Sequence[str]) -> list[str]:
    users = ["--userns", str(userns_fd)] if userns_fd is not None else ["--unshare-user"]
    command = [bwrap, *users, "--uid", str(NOBODY), "--gid", str(NOBODY), "--unshare-ipc", "--unshare-pid",
               "--unshare-net", "--unshare-uts", "--unshare-cgroup", "--die-with-parent", "--new-session",
               "--clearenv"]
    for name, value in SANDBOX_ENV.items():
        command += ["--setenv", name, value]
    for path in SYSTEM_PATHS:
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    for folder in _interpreter()[1]:
        command += ["--ro-bind", folder, folder]
    command += ["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
                "--size", str(sandbox.tmp_mb * 1024 * 1024), "--tmpfs", SANDBOX_FOLDER, "--chdir", SANDBOX_FOLDER,
                "--remount-ro", "/", *argv]
    return command


def _bwrap_options(isolation: Isolation) -> dict[str, Any]:
    """Popen arguments for bubblewrap: as uid 65534 when the evaluator is root, in a folder any user may enter."""
    options: dict[str, Any] = {"cwd": "/", "env": {"PATH": SANDBOX_ENV["PATH"], "LANG": SANDBOX_ENV["LANG"]}}
    if isolation.userns_fd is not None:
        options.update(user=NOBODY, group=NOBODY, extra_groups=[], pass_fds=(isolation.userns_fd,))
    return options


def _nobody_user_namespace() -> tuple[int | None, str]:
    """(root only) A user namespace owned by uid 65534, mapping 65534 and 0 to themselves; (its fd, "") or (None,
    why it could not be made). Made once per process: bubblewrap processes join it with `--userns`."""
    global _userns
    if _userns is not None:
        return _userns
    try:
        helper = subprocess.Popen(["unshare", "--user", "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
    except OSError as error:
        _userns = (None, f"cannot run `unshare` as uid {NOBODY} to make its user namespace: {error.strerror}")
        return _userns
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 30
        while helper.poll() is None and os.readlink(f"/proc/{helper.pid}/ns/user") == own:
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.001)
        if helper.poll() is not None:  # unshare failed: unprivileged user namespaces are off, or similar
            helper.stdin.close()
            reason = helper.stderr.read().decode(errors="replace").strip().splitlines()
            _userns = (None, f"uid {NOBODY} cannot create a user namespace: "
                             f"{reason[-1] if reason else f'unshare exited with status {helper.returncode}'}")
            return _userns
        mapping = f"0 0 1\n{NOBODY} {NOBODY} 1\n"  # written whole, in one write, as the kernel requires
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as handle:
                handle.write(mapping)
        _userns = (os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY), "")
    except (OSError, TimeoutError) as error:
        _userns = (None, f"cannot set up the user namespace for uid {NOBODY}: {error}")
    finally:
        helper.stdin.close()  # cat ends; the namespace lives on while the fd is open
        helper.wait()
        helper.stderr.close()
    return _userns


def _probe(bwrap: str) -> Isolation:
    userns_fd = None
    if os.geteuid() == 0:
        userns_fd, problem = _nobody_user_namespace()
        if userns_fd is None:
            return Isolation(None, problem)
    candidate = Isolation(bwrap, userns_fd=userns_fd)
    command = _bwrap_command(bwrap, userns_fd, Sandbox(), [_interpreter()[0], "-I", "-S", "-B", "-c", _PROBE])
    try:
        probe = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                               **_bwrap_options(candidate))
        version = subprocess.run([bwrap, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return Isolation(None, f"cannot run {bwrap}: {getattr(error, 'strerror', None) or error}")
    if probe.returncode != 0:
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        return Isolation(None, lines[-1] if lines else f"{bwrap} exited with status {probe.returncode}")
    try:
        facts = json.loads(probe.stdout)
    except ValueError:
        return Isolation(None, f"{bwrap} ran, but the probe program printed {probe.stdout[-200:]!r}")
    facts["version"] = version.stdout.decode(errors="replace").strip()
    # The kernel lets a fork past RLIMIT_NPROC only for root outside (or capabilities there): a refused fork shows
    # that the sandbox's user is not root outside, however many user namespaces bubblewrap nests.
    if facts["fork"] != "refused":
        return Isolation(None, f"{bwrap} runs, but its user is root outside, where RLIMIT_NPROC does not bind")
    if facts["capabilities"] != 0:
        return Isolation(None, f"{bwrap} runs, but the program keeps capabilities ({facts['capabilities']:#x})")
    return Isolation(bwrap, facts=facts, userns_fd=userns_fd)


def isolation(sandbox: Sandbox) -> Isolation:
    """Whether `sandbox.bwrap` isolates programs on this machine: probed once per executable and process."""
    executable = shutil.which(sandbox.bwrap)
    if executable is None:
        return Isolation(None, f"{sandbox.bwrap!r} is not installed")
    with _lock:
        if executable not in _probed:
            _probed[executable] = _probe(executable)
        return _probed[executable]


def require_isolation(sandbox: Sandbox) -> Isolation:
    """`isolation(sandbox)`, or `SandboxUnavailable` when it has none and `sandbox.allow_unisolated` is not set."""
    found = isolation(sandbox)
    if found.bwrap is None and not sandbox.allow_unisolated:
        raise SandboxUnavailable(
            f"cannot isolate model-written programs: {found.problem}. Install bubblewrap (apt-get install "
            f"bubblewrap), or pass {UNSAFE_FLAG} to run them without isolation, able to reach your files, "
            "network and processes.")
    return found


def describe(sandbox: Sandbox) -> dict[str, Any]:
    """What is enforced on the programs on this machine, for the results file."""
    found = require_isolation(sandbox)
    limits = {"timeout_s": sandbox.timeout, "cpu_s": _cpu_seconds(sandbox), "memory_mb": sandbox.memory_mb,
              "file_size_mb": sandbox.file_size_mb}
    scoring = ("passed only when the harness confirmed that the program's last line (the tests) returned, by a "
               "per-run random token it writes afterwards; exit statuses do not count")
    guard = ("in-process guard (sockets, new processes, signals, writes outside the working folder and ctypes-like "
             "imports refused): an extra layer the program can undo, not a boundary")
    if found.bwrap is not None:
        facts = found.facts
        return {
            "isolated": True,
            "isolation": f"{facts['version']} ({found.bwrap}): own user, mount, PID, network, IPC, UTS and cgroup "
                         "namespaces",
            "filesystem": f"read-only: {', '.join(_visible_paths())}; writable: only a private {sandbox.tmp_mb} MiB "
                          f"tmpfs at {SANDBOX_FOLDER} (the working folder); nothing else of the host exists there",
            "root_listing": facts["root"],  # what the probe found in / inside the sandbox
            "user": f"uid {facts['uid']} without capabilities inside, uid "
                    f"{NOBODY if found.userns_fd is not None else os.geteuid()} outside",
            "network": "own network namespace with only its loopback: nothing of the host, 127.0.0.1 included",
            "processes": "own PID namespace (no other process visible or signalled); RLIMIT_NPROC 0, checked to "
                         "bind: no new processes or threads",
            **limits, "tmp_mb": sandbox.tmp_mb, "scoring": scoring, "python_guard": guard,
        }
    root = os.geteuid() == 0
    return {
        "isolated": False,
        "isolation": f"NONE ({UNSAFE_FLAG}): {found.problem}",
        "filesystem": "the host's, working in a fresh temporary folder; writes elsewhere refused by the in-process "
                      "guard only; reads unrestricted",
        "user": f"the evaluator's (uid {os.geteuid()})",
        "network": "the host's; socket functions removed by the in-process guard only",
        "processes": "the host's; fork, exec and kill removed by the in-process guard only; RLIMIT_NPROC 0"
                     + (" (not binding: the evaluator is root)" if root else ""),
        **limits, "scoring": scoring, "python_guard": guard,
    }


# --------------------------------------------------------------------------------------------------------------------
# Running programs
# --------------------------------------------------------------------------------------------------------------------


def _cpu_seconds(sandbox: Sandbox) -> int:
    return math.ceil(sandbox.timeout) + 1


def _limit_resources(sandbox: Sandbox) -> Callable[[], None]:
    """The `preexec_fn`: runs in the child between fork and exec, so the limits bind from the first instruction.
    (RLIMIT_NPROC is set by the guard inside the sandbox: bubblewrap itself must still start the program.)"""
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


def _failure_detail(returncode: int, isolated: bool, output: str) -> str:
    # bubblewrap reports a program killed by signal N as exit status 128 + N.
    signal_number = -returncode if returncode < 0 else returncode - 128 if isolated and returncode > 128 else 0
    if signal_number:
        return _SIGNALS.get(signal_number, f"killed by signal {signal_number}")
    if returncode == 0:
        return "ended itself (exit status 0) before its tests ran to the end"
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit status {returncode}"


def _read_available(fd: int, limit: int = 4096) -> bytes:
    """What a pipe holds now, without waiting for writers that may still hold it open."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def run_python(source: str, sandbox: Sandbox = Sandbox()) -> ExecutionResult:
    """Run `source` as a Python program in the sandbox; it passes when its last line returned in time.

    Raises `SandboxUnavailable` when bubblewrap cannot isolate it and `sandbox.allow_unisolated` is not set."""
    found = require_isolation(sandbox)
    token = secrets.token_hex(16).encode()
    verdict_read, verdict_write = os.pipe()
    workdir = None if found.bwrap is not None else tempfile.mkdtemp(prefix="qwen-eval-")
    try:
        if found.bwrap is not None:
            python = [_interpreter()[0], "-I", "-S", "-B", "-c", GUARD_SOURCE, str(verdict_write)]
            command = _bwrap_command(found.bwrap, found.userns_fd, sandbox, python)
            options = _bwrap_options(found)
            options["pass_fds"] = (*options.get("pass_fds", ()), verdict_write)
        else:
            command = [sys.executable, "-I", "-S", "-B", "-c", GUARD_SOURCE, str(verdict_write)]
            options = {"cwd": workdir, "pass_fds": (verdict_write,),
                       "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}}
        # Output goes to a file: the file size limit then caps it too, and a pipe could not fill up and stall it.
        with tempfile.TemporaryFile() as output_file:
            try:
                process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=output_file, stderr=subprocess.STDOUT, bufsize=0,
                    preexec_fn=_limit_resources(sandbox), start_new_session=True, close_fds=True, **options)
            finally:
                os.close(verdict_write)
            timed_out = False
            try:
                # The token, then the program: the guard reads both before the program starts.
                process.communicate(token + b"\n" + source.encode("utf-8"), timeout=sandbox.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: bubblewrap, and with it everything in its namespaces
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
                if process.stdin is not None:
                    process.stdin.close()
            verdict = _read_available(verdict_read)
            output_file.seek(0, os.SEEK_END)
            size = output_file.tell()
            output_file.seek(max(0, size - 4 * OUTPUT_TAIL))
            output = output_file.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]
    finally:
        os.close(verdict_read)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if verdict == token:
        return ExecutionResult("passed", "", output)
    if timed_out:
        return ExecutionResult("timed out", f"no result within {sandbox.timeout:g} s", output)
    if size >= sandbox.file_size_mb * 1024 * 1024:  # Python ignores SIGXFSZ: its writes fail and it exits
        return ExecutionResult("failed", "file size limit reached (too much output?)", output)
    return ExecutionResult("failed", _failure_detail(process.returncode, found.bwrap is not None, output), output)


def run_many(
    sources: Sequence[str],
    sandbox: Sandbox = Sandbox(),
    workers: int | None = None,
    on_done: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """`run_python` for each source, `workers` at a time (default: one per CPU); results in the order given."""
    require_isolation(sandbox)  # refuse before the first program, not in every worker
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

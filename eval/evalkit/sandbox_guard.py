"""Runs first in the sandboxed child, before the program: `python -I -S -B -c <this file's text> VERDICT_FD`.

What it does, in order:

1. reads its standard input: a per-run random token on the first line, the program after it; then standard input
   becomes /dev/null (a solution that calls `input()` gets EOF, as before);
2. sets RLIMIT_NPROC to 0: from here on the process can start neither processes nor threads. This one is a kernel
   limit, and it binds inside bubblewrap, where the process's user is not root outside (`sandbox.py` sees to that);
3. takes away, at the Python level, what a HumanEval solution never needs (the list below);
4. runs the program (as module `sandboxed_program`, so a solution's `if __name__ == "__main__":` demo does not run);
5. only when the program's last line, the tests' `check(...)` call, has returned: writes the token to the pipe
   VERDICT_FD and ends the process at once with `os._exit(0)`, so no atexit hook or finalizer of the program runs
   after it. On any exception, `SystemExit` included, it prints why and ends with status 1 without the token.

The evaluator scores a program as passed only when the pipe holds the token: the exit status does not count, so
`sys.exit(0)`, `os._exit(0)` or an atexit hook cannot turn failed tests into a pass. The program cannot know the
token in advance; one written to search this process's memory for it could still forge a pass. That is an attack on
the score, not a wrong answer that exits early, and the operating-system sandbox around the process still holds.

The Python-level layer, an extra one and not the boundary (the program can undo all of it, for instance by
re-importing `posix`; bubblewrap's namespaces and the rlimits are the walls):

- no new processes: fork, exec, spawn, system, popen, posix_spawn and the subprocess machinery raise
  PermissionError, and so do kill/killpg;
- no network: every socket constructor, socketpair, fromfd and getaddrinfo (DNS) raise PermissionError;
- no writes outside the working folder: open/os.open for writing, and removing, renaming, linking, chmod/chown,
  mkdir and the like, are refused for any path that resolves outside it;
- no ctypes, cffi or multiprocessing imports.

Without bubblewrap (the evaluator's `--allow-unsafe-execution`) this layer and the rlimits are all there is. It must
import only the standard library: the child runs with -I -S, without site-packages.
"""

import builtins
import io
import os
import resource
import sys
import traceback

# Kept before the program runs: the program may replace os.write or os._exit with its own functions.
_write = os.write
_exit = os._exit
_stderr = sys.stderr


def _refuse(what: str):
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(f"{what} is not allowed in the evaluation sandbox")

    refused.__name__ = what
    return refused


def _limit_processes() -> None:
    # The kernel exempts root, and a user namespace whose user is root outside, from this limit; sandbox.py runs
    # bubblewrap so that it binds, and describes the unisolated mode for what it is.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    import _posixsubprocess
    import posix

    names = ["fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "pidfd_open"]
    # Both modules: os copies its functions from posix, and importlib.reload(os) would copy them back.
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = _refuse("subprocess")


def _block_network() -> None:
    import _socket
    import socket

    for module in (socket, _socket):
        for name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"socket.{name}"))


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _guard_files(workdir: str) -> None:
    import _io

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already open descriptor: opened through these checks
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == workdir or real.startswith(workdir + os.sep)

    def check(path: object, what: str, kwargs: dict) -> None:
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None \
                or kwargs.get("dst_dir_fd") is not None or not inside(path):
            raise PermissionError(f"{what} outside the sandbox's working folder is not allowed: {path!r}")

    real_open = _io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            check(file, "writing", kwargs)
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            check(path, "writing", kwargs)
        return real_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+"):
                check(file, "writing", kwargs)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = guarded_os_open

    def guard_paths(name: str, count: int) -> None:
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            for path in args[:count]:
                check(path, f"os.{name}", kwargs)
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name, count in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1), ("mkfifo", 1),
                        ("mknod", 1), ("truncate", 1), ("chmod", 1), ("lchmod", 1), ("chown", 1), ("lchown", 1),
                        ("utime", 1), ("rename", 2), ("renames", 2), ("replace", 2), ("link", 2), ("symlink", 2),
                        ("removedirs", 1), ("chflags", 1), ("lchflags", 1), ("setxattr", 1), ("removexattr", 1)]:
        if hasattr(os, name):
            guard_paths(name, count)


class _ImportBlocker:
    """Refuses modules that reach around the guards: foreign function calls and process pools."""

    blocked = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "multiprocessing", "_multiprocessing"}

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in self.blocked:
            raise ImportError(f"importing {name} is not allowed in the evaluation sandbox")
        return None


def _flush_output() -> None:
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}.values():
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced them; its output is then its own business
            pass


def _fail(message: str | None) -> None:
    """Report why the program did not run to its end, and end the process without the token."""
    _flush_output()
    try:
        if message is None:
            traceback.print_exc(file=_stderr)
        else:
            print(message, file=_stderr)
        _stderr.flush()
    finally:
        _exit(1)


def main() -> None:
    verdict_fd = int(sys.argv[1])
    token, _, source = sys.stdin.buffer.read().partition(b"\n")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    workdir = os.path.realpath(os.getcwd())
    _limit_processes()
    _block_network()
    _guard_files(workdir)
    for name in list(sys.modules):
        if name.partition(".")[0] in _ImportBlocker.blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, _ImportBlocker())
    sys.argv = ["program.py"]
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "sandboxed_program", "__builtins__": builtins})
    except SystemExit as stop:
        _fail(f"SystemExit({stop.code!r}): the program ended itself before its tests ran to the end")
    except BaseException:
        _fail(None)
    _flush_output()
    _write(verdict_fd, token)
    _exit(0)


main()

"""Runs first in the sandboxed child, before the program: `python -I -S -B -c <this file's text> PROGRAM`.

It reads PROGRAM (a file in the child's own empty working folder), then takes away what a HumanEval solution never
needs, and only then runs the program. The operating-system limits set by `sandbox.py` (rlimits, namespaces) are the
real walls; this is the second layer, for what rlimits cannot express or where namespaces are unavailable:

- no new processes: RLIMIT_NPROC 0 (the kernel ignores it for root, hence also) fork, exec, spawn, system, popen and
  the subprocess machinery raise PermissionError, and so do kill/killpg, so a program cannot signal the evaluator;
- no network: every socket constructor, socketpair, fromfd and getaddrinfo (DNS) raise PermissionError;
- no writes outside the working folder: open/os.open for writing, and removing, renaming, linking, chmod/chown,
  mkdir and the like, are refused for any path that resolves outside it;
- no ctypes, cffi or multiprocessing imports, which would reach around all of the above.

Nothing here can be relied on against a determined attacker in the same process (Python has no such boundary); it
stops accidents and casual escapes, and the tests show each one refused. It must import only the standard library:
the child runs with -I -S, without site-packages.
"""

import builtins
import io
import os
import sys


def _refuse(what: str):
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(f"{what} is not allowed in the evaluation sandbox")

    refused.__name__ = what
    return refused


def _limit_processes() -> None:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
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


def main() -> None:
    program = sys.argv[1]
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    workdir = os.path.realpath(os.getcwd())
    _limit_processes()
    _block_network()
    _guard_files(workdir)
    for name in list(sys.modules):
        if name.partition(".")[0] in _ImportBlocker.blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, _ImportBlocker())
    code = compile(source, program, "exec")
    sys.argv = [program]
    # Not "__main__": as in the HumanEval harness, a solution's `if __name__ == "__main__":` demo does not run.
    exec(code, {"__name__": "sandboxed_program", "__builtins__": builtins})


main()

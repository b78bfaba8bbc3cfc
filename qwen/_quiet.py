"""Quiet the start-up messages of optional third-party packages, before any of them is imported.

The GPTQ, LoRA and DeepSpeed extras print lines on every start of every script, whether or not the script uses them:
torchao cannot load its CUDA kernels on a CPU build of torch and logs one warning per library file, plus torch's
notices about the enums it registers; bitsandbytes (imported by peft) and `kernels` warn that an optional faster CPU
kernel could not be fetched;
DeepSpeed (imported by accelerate) announces on stdout that it fell back to the CPU; gptqmodel (imported by peft,
optimum or transformers when it is installed) prints a banner, its version table and its environment settings. They
would bury our own one-line errors. Errors still show, a level the user set on one of these loggers is kept, and
gptqmodel's own progress logs (while quantizing) are untouched: only what it prints while being imported is dropped.

It must run before those packages are imported, which is why `qwen/__init__.py` calls it first, and why scripts import
`qwen` before transformers' Trainer (whose import brings torchao).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any

# Loggers whose warnings are start-up noise; raised to ERROR unless the user chose a level for them. bitsandbytes'
# CPU backend asks the `kernels` package for an optional faster kernel from the hub at import, and both log about it.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops", "kernels")


class _DropAcceleratorFallback(logging.Filter):
    """DeepSpeed's "Setting accelerator to CPU..." warning (and any other notice from its accelerator detection).

    A filter, not a level: DeepSpeed sets its logger's level itself when it is imported, overriding any set before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.funcName != "get_accelerator"


class _LoggerOffWhileImporting(importlib.abc.Loader):
    """A package's own loader, with a logger disabled while the package's top-level module runs."""

    def __init__(self, loader: importlib.abc.Loader, logger_name: str) -> None:
        self._loader = loader
        self._logger_name = logger_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        logger = logging.getLogger(self._logger_name)
        was_disabled = logger.disabled
        logger.disabled = True
        try:
            self._loader.exec_module(module)
        finally:
            logger.disabled = was_disabled

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_source, is_package...: the real loader's
        return getattr(self._loader, name)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
    """Finds gptqmodel as the other finders do, and imports it with its logger off.

    gptqmodel logs through LogBar (the `logbar` logger), which writes to stdout itself instead of through handlers
    and sets its own level when gptqmodel creates it during the import, so neither a level nor a filter set
    beforehand reaches the banner; disabling the logger for the duration of the import does.
    """

    packages = {"gptqmodel": "logbar"}

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        logger_name = self.packages.get(fullname)
        if logger_name is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoggerOffWhileImporting(spec.loader, logger_name)
                return spec
        return None


def quiet_third_party_startup() -> None:
    """Install the levels, filter and import hook above; calling it again changes nothing."""
    for name in NOISY_LOGGERS:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.ERROR)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropAcceleratorFallback) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropAcceleratorFallback())
    if not any(isinstance(finder, _QuietImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImportFinder())

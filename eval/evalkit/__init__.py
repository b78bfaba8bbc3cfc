"""Shared code of the `eval/` scripts: dataset readers, prompts, batched scoring, answer extraction, sandboxed code
execution and resumable result files. The scripts in `eval/` only parse their arguments and call `evalkit.tasks`.

The scripts run as files (`python eval/evaluate_mmlu.py ...`), so Python puts `eval/` first on `sys.path` and finds
this package there. The repository root is put in front: the scripts use the `qwen` package of the clone they
live in, even when another copy of `qwen` is installed in the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

"""HumanEval, 0-shot pass@1 with greedy decoding, for base models: the model continues each prompt; the completion,
cut where the published runs cut it, runs against the task's tests in a sandboxed process.

    python eval/evaluate_humaneval.py -c Qwen/Qwen-7B -d data/humaneval"""

import sys

from evalkit.tasks import run_humaneval

if __name__ == "__main__":
    sys.exit(run_humaneval(chat=False, description=__doc__))

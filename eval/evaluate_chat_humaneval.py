"""HumanEval, 0-shot pass@1 with greedy decoding, for chat models: the original's prompt ("Write a Python function
`<signature>` to solve the following problem:", the docstring, then the task's prompt) is one chat turn; the code is
taken from the reply and run against the task's tests in a sandboxed process.

    python eval/evaluate_chat_humaneval.py -c Qwen/Qwen-7B-Chat -d data/humaneval"""

import sys

from evalkit.tasks import run_humaneval

if __name__ == "__main__":
    sys.exit(run_humaneval(chat=True, description=__doc__))

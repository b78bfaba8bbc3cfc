"""HumanEval, 0-shot pass@1 with greedy decoding, for chat models: "Help me fill the following code." and the
prompt make one chat turn; the code is taken from the reply and run against the task's tests in a sandboxed process.

    python eval/evaluate_chat_humaneval.py -c Qwen/Qwen-7B-Chat -d data/humaneval"""

import sys

from evalkit.tasks import run_humaneval

if __name__ == "__main__":
    sys.exit(run_humaneval(chat=True, description=__doc__))

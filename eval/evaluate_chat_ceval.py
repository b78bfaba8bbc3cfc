"""C-Eval, 0-shot, for chat models: each val question is one chat turn; the letter is read from the greedy reply.
The score is the mean of the subjects' accuracies.

    python eval/evaluate_chat_ceval.py -c Qwen/Qwen-7B-Chat -d data/ceval"""

import sys

from evalkit.tasks import CEVAL, run_choice_chat

if __name__ == "__main__":
    sys.exit(run_choice_chat(CEVAL, description=__doc__))

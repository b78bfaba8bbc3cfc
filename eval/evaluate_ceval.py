"""C-Eval, 5-shot, for base models: the letter with the highest next-token probability after "答案：". Evaluated on
the val split (the test split has no public answers); the score is the mean of the subjects' accuracies.

    python eval/evaluate_ceval.py -c Qwen/Qwen-7B -d data/ceval"""

import sys

from evalkit.tasks import CEVAL, run_choice_base

if __name__ == "__main__":
    sys.exit(run_choice_base(CEVAL, description=__doc__))

"""GSM8K, 0-shot, for chat models: the question is the chat turn (with --use-fewshot, after the original chat
script's four exemplars, rebuilt from GSM8K's train.jsonl); the last number of the greedy reply must equal the
reference answer.

    python eval/evaluate_chat_gsm8k.py -c Qwen/Qwen-7B-Chat -d data/gsm8k [--use-fewshot]"""

import sys

from evalkit.tasks import run_gsm8k

if __name__ == "__main__":
    sys.exit(run_gsm8k(chat=True, description=__doc__))

"""Tool use through ReAct prompts, for chat models: tool selection accuracy and action-input ROUGE-L on samples
that need a tool, and the false-positive rate (a tool called anyway) on samples that need none.

    python eval/evaluate_plugin.py -c Qwen/Qwen-7B-Chat -d data/plugin   # -d defaults to eval/data, as originally"""

import sys

from evalkit.tasks import run_tool_use

if __name__ == "__main__":
    sys.exit(run_tool_use(description=__doc__))

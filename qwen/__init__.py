"""Qwen (v1) models on today's PyTorch and transformers: model, tokenizer, chat.

Importing this package registers the classes with transformers' Auto classes under model_type "qwen", so
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load a released checkpoint
folder without `trust_remote_code`.
"""

import logging

# The GPTQ extra brings torchao, which transformers imports with PreTrainedModel. On a CPU build of torch its
# CUDA-only kernels fail to load and it logs a warning per library file, plus torch's notices about the enums it
# registers: lines on every start of every script that would bury our own one-line errors. Errors still show, and a
# level the user set is kept.
for _name in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .configuration_qwen import QWenConfig  # noqa: E402
from .modeling_qwen import QWenLMHeadModel, QWenModel  # noqa: E402
from .tokenization_qwen import QWenTokenizer  # noqa: E402

AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer"]

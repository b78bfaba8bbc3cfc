"""Qwen (v1) models on today's PyTorch and transformers: model, tokenizer, chat.

Importing this package registers the classes with transformers' Auto classes under model_type "qwen", so
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load a released checkpoint
folder without `trust_remote_code`.
"""

from ._quiet import quiet_third_party_startup

# First, before transformers (which imports torchao with PreTrainedModel) and the optional packages it brings.
quiet_third_party_startup()

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .configuration_qwen import QWenConfig  # noqa: E402
from .modeling_qwen import QWenLMHeadModel, QWenModel  # noqa: E402
from .tokenization_qwen import QWenTokenizer  # noqa: E402

AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer"]

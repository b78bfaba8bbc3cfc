"""`load_model_on_gpus` of the original README, for scripts that do `from utils import load_model_on_gpus`:

    from utils import load_model_on_gpus
    model = load_model_on_gpus("Qwen-7B-Chat", num_gpus=2)

The split itself (which GPU holds which module) is `qwen.device_map.qwen_device_map`, a pure function.
"""

from qwen.device_map import device_map_for_config, load_model_on_gpus, qwen_device_map

__all__ = ["device_map_for_config", "load_model_on_gpus", "qwen_device_map"]

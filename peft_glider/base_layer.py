"""What Glider reads of the base layers it wraps: which ones it can adapt, their weight and bias (dequantized, read
from accelerate's offload), and the device they compute on."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """Whether Glider can adapt `module`: an nn.Linear, or transformers' Conv1D (GPT-2 family: its weight is stored
    transposed, (in, out); LoRA factors are the same as for a linear layer)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as (out, in), dequantized (bitsandbytes, torchao), in float32; read from accelerate's
    offload (CPU or disk) when the layer is dispatched with it."""
    from accelerate.utils import align_module_device
    from peft.utils.integrations import dequantize_module_weight
    from transformers.pytorch_utils import Conv1D

    with align_module_device(module):
        weight = dequantize_module_weight(module).detach().float()
    return weight.T if isinstance(module, Conv1D) else weight


def base_bias(module: nn.Module, device: torch.device) -> Optional[torch.Tensor]:
    """The base layer's bias (None without one), read from accelerate's offload when the layer is offloaded (its
    tensors are on `meta` outside its forward)."""
    bias = getattr(module, "bias", None)
    if bias is None or bias.device.type != "meta":
        return bias
    from accelerate.utils import align_module_device

    with align_module_device(module, device):
        return module.bias.detach().clone()


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device a module computes on: accelerate's hook execution device if it has one, else its weight's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return None
    return weight.device

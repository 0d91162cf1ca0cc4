"""Loading a saved Glider adapter onto a base model, including models dispatched by accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from .config import GliderConfig


def glider_config(model_id: Union[str, Path], **hub_kwargs) -> GliderConfig:
    """The `GliderConfig` of a saved adapter (folder or Hub id); `ValueError` naming the type of any other adapter."""
    config = PeftConfig.from_pretrained(str(model_id), **hub_kwargs)
    if not isinstance(config, GliderConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"{model_id} holds a {kind} adapter, not a Glider adapter.")
    return config


def load_glider(
    model: nn.Module,
    model_id: Union[str, Path],
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: Optional[str] = None,
) -> PeftModel:
    """Load a Glider adapter (local folder or Hub id) onto `model`, keeping accelerate's hooks in place.

    Equivalent to `PeftModel.from_pretrained(model, model_id)`, which strips and re-dispatches the hooks of a
    model whose device map includes `"cpu"` or `"disk"` and then fails on the offloaded (meta) weights; this
    loader builds the Glider model on the dispatched model as it is and loads the adapter's state dict into it.
    """
    hub_kwargs = {"revision": revision} if revision else {}
    config = glider_config(model_id, **hub_kwargs)
    config.inference_mode = not is_trainable
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    state_dict = load_peft_weights(str(model_id), device="cpu", **hub_kwargs)
    result = set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}" in key and "glider_" in key]
    if missing:
        raise ValueError(f"The Glider adapter at {model_id} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}.")
    if not is_trainable:
        peft_model.eval()
        for param in peft_model.parameters():
            param.requires_grad = False
    return peft_model

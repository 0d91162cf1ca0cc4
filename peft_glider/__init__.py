"""peft-glider: GLIDER routing over a library of LoRA experts, as a PEFT method.

Importing this package registers the PEFT method `GLIDER`, so that `get_peft_model`, `save_pretrained`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModel*` handle Glider adapters.
"""

from ._registration import register
from .config import GliderConfig
from .expert_training import LoraTrainingArguments, train_lora_expert
from .experts import save_gates
from .hub import install_peft_model_hooks, push_to_hub
from .global_router import (
    ExpertDescriptions,
    GlobalRouter,
    LocalModelWriter,
    OpenAIWriter,
    RouteInfo,
    SamplesWriter,
    SentenceTransformerEmbedder,
)
from .layer import GliderLayer, GliderLinear
from .loading import load_glider
from .local_router import (
    GateTrainingArguments,
    train_expert_gates,
    train_gates,
    train_missing_gates,
    untrained_experts,
)
from .model import GliderModel
from .state import RoutingTrace

register(config_cls=GliderConfig, model_cls=GliderModel)
install_peft_model_hooks()

__version__ = "0.1.0.dev0"

__all__ = [
    "ExpertDescriptions",
    "GateTrainingArguments",
    "GliderConfig",
    "GliderLayer",
    "GliderLinear",
    "GliderModel",
    "GlobalRouter",
    "LocalModelWriter",
    "LoraTrainingArguments",
    "OpenAIWriter",
    "RouteInfo",
    "SamplesWriter",
    "SentenceTransformerEmbedder",
    "RoutingTrace",
    "__version__",
    "install_peft_model_hooks",
    "load_glider",
    "push_to_hub",
    "save_gates",
    "train_expert_gates",
    "train_gates",
    "train_lora_expert",
    "train_missing_gates",
    "untrained_experts",
]

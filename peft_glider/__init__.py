"""peft-glider: GLIDER routing over a library of LoRA experts, as a PEFT method.

Importing this package registers the PEFT method `GLIDER`, so that `get_peft_model`, `save_pretrained`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModel*` handle Glider adapters.
"""

from ._registration import register as _register

_register()

from .config import GliderConfig  # noqa: E402
from .experts import save_gates  # noqa: E402
from .global_router import GlobalRouter, LocalModelWriter, OpenAIWriter, RouteInfo, SamplesWriter  # noqa: E402
from .global_router import SentenceTransformerEmbedder  # noqa: E402
from .layer import GliderLayer, GliderLinear  # noqa: E402
from .loading import load_glider  # noqa: E402
from .local_router import (  # noqa: E402
    GateTrainingArguments,
    train_expert_gates,
    train_gates,
    train_missing_gates,
    untrained_experts,
)
from .model import GliderModel  # noqa: E402
from .state import RoutingTrace  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "GateTrainingArguments",
    "GliderConfig",
    "GliderLayer",
    "GliderLinear",
    "GliderModel",
    "GlobalRouter",
    "LocalModelWriter",
    "OpenAIWriter",
    "RouteInfo",
    "SamplesWriter",
    "SentenceTransformerEmbedder",
    "RoutingTrace",
    "__version__",
    "load_glider",
    "save_gates",
    "train_expert_gates",
    "train_gates",
    "train_missing_gates",
    "untrained_experts",
]

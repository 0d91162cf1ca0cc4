"""Local routers: Phatgoose gate training (Arrow prototypes are computed from the factors in `routing`)."""

from .phatgoose import GateTrainingArguments, train_expert_gates, train_gates, train_missing_gates, untrained_experts

__all__ = ["GateTrainingArguments", "train_expert_gates", "train_gates", "train_missing_gates", "untrained_experts"]

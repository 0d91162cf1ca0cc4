"""Phatgoose gate training: one expert at a time, base and expert frozen, only its gate vectors learn.

At every module the expert adapts, the model computes `W u + sigmoid(gate . u) * s * B A u` (raw `u`) and the
expert's own LM loss on a sample of its data trains the gates (algorithm.md §1). Runs in one process or
data-parallel under `accelerate launch`: each process takes its share of every global batch and the gate
gradients are summed across processes, so the result matches one process with the same global batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..experts import save_gates
from ..state import call_routing
from .data import GateData, IGNORE_INDEX, build_examples, collate, loss_tokens


@dataclass
class GateTrainingArguments:
    """Defaults are the published ones: 100 steps, AdamW, lr 5e-3, constant schedule with 6% warmup, no decay."""

    steps: int = 100
    learning_rate: float = 5e-3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    batch_size: int = 8  # global batch, split across processes
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("steps and batch_size must be >= 1 and max_length >= 2.")
        if not 0.0 <= self.warmup_ratio < 1.0 or self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("warmup_ratio must lie in [0, 1), learning_rate be > 0 and weight_decay >= 0.")


def _global_batches(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Seeded epochs of shuffled indices, cut into `steps` global batches (identical in every process)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(num_examples, generator=generator).tolist()
    return [order[step * batch_size : (step + 1) * batch_size] for step in range(steps)]


def _summed_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], is_encoder_decoder: bool) -> torch.Tensor:
    if is_encoder_decoder:
        logits = model(**batch).logits  # decoder inputs are the labels shifted right
        labels = batch["labels"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_gates(
    model: nn.Module,
    expert: str,
    data: GateData,
    tokenizer: Any = None,
    args: Optional[GateTrainingArguments] = None,
    accelerator: Any = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Train the gates of one expert of a Glider model in place; return them as `{module_name: gate}`.

    Args:
        model: A `PeftModel` holding a Glider adapter (local_router "phatgoose").
        expert: The expert's name (see `GliderModel.expert_names`).
        data: The expert's data: texts, (input, target) pairs (loss on targets only), or a `datasets.Dataset`
            with `text`, `input`/`target` or `input_ids` columns.
        tokenizer: Needed unless the data is pre-tokenized.
        args: Hyper-parameters (defaults from the paper).
        accelerator: An `accelerate.Accelerator`; one is created if None (works under `accelerate launch`).
        adapter_name: The Glider adapter, when several are loaded.
        progress: Show a progress bar on the main process.
    """
    from accelerate import Accelerator
    from transformers import get_constant_schedule_with_warmup

    args = args or GateTrainingArguments()
    accelerator = accelerator or Accelerator()
    glider = model.base_model
    adapter = glider.resolve_adapter(adapter_name)
    state = glider.routing_state(adapter)
    if not state.local_router.learned:
        raise ValueError(
            f"Gate training is for local routers with learned gates (phatgoose); this adapter uses "
            f"{state.local_router.name!r}."
        )
    names = glider.expert_names_of(adapter)
    if expert not in names:
        raise KeyError(f"train_gates: unknown expert {expert!r}; experts are {names}.")
    index = names.index(expert)
    glider.make_resident([expert], adapter)  # under a budget: its gates are rows of the layers' parameters
    layers = {
        name: layer for name, layer in glider.glider_layers(adapter).items() if layer.adapts(adapter, index)
    }
    params = [layer.gate_parameter(adapter) for layer in layers.values()]
    rows = [layer.installed_snapshot(adapter).row(index) for layer in layers.values()]  # the expert's row in each
    saved_rows = [param.detach().clone() for param in params]  # other experts' gates stay as they are
    with torch.no_grad():
        for param, row in zip(params, rows):
            param[row] = 0.0

    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    examples = build_examples(data, tokenizer, is_encoder_decoder, args.max_length)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    pad_token_id = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    if not getattr(model, "hf_device_map", None):
        model.to(accelerator.device)

    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=round(args.warmup_ratio * args.steps))
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: deterministic, and identical across process counts
    rank, world = accelerator.process_index, accelerator.num_processes
    try:
        batches = _global_batches(len(examples), args.batch_size, args.steps, args.seed)
        with call_routing(state, gate_training_expert=index):
            for global_batch in tqdm(
                batches, desc=f"Training gates of {expert}", disable=not progress or not accelerator.is_main_process
            ):
                total_tokens = max(1, sum(loss_tokens(examples[i], is_encoder_decoder) for i in global_batch))
                mine = global_batch[rank::world]
                if mine:
                    batch = collate([examples[i] for i in mine], pad_token_id, is_encoder_decoder)
                    batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                    (_summed_token_loss(model, batch, is_encoder_decoder) / total_tokens).backward()
                for param in params:
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    param.grad = accelerator.reduce(grad, reduction="sum") if world > 1 else grad
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        with torch.no_grad():
            for param, row, saved in zip(params, rows, saved_rows):
                keep = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
                keep[row] = False
                param[keep] = saved.to(param.device)[keep]
    glider.record_gates(
        expert, f"trained ({args.steps} steps, learning rate {args.learning_rate:g}, {len(examples)} examples)", adapter
    )
    return {name: param[row].detach().cpu().clone() for name, param, row in zip(layers, params, rows)}


def untrained_experts(model: nn.Module, adapter_name: Optional[str] = None) -> list[str]:
    """Experts whose gates are all still zero (their initial value): they have no informed local routing."""
    gates = model.base_model.get_gates(adapter_name)
    return [name for name, per_module in gates.items() if all(not gate.any() for gate in per_module.values())]


def train_missing_gates(
    model: nn.Module,
    data: Mapping[str, GateData],
    tokenizer: Any = None,
    args: Optional[GateTrainingArguments] = None,
    accelerator: Any = None,
    adapter_name: Optional[str] = None,
) -> list[str]:
    """Train, in place, the gates of every expert that has none yet; return their names.

    `data` maps expert names to their data; an untrained expert missing from it is an error naming it.
    """
    missing = untrained_experts(model, adapter_name)
    lacking_data = [name for name in missing if name not in data]
    if lacking_data:
        raise KeyError(f"train_missing_gates: no data for untrained expert(s) {lacking_data}.")
    for name in missing:
        train_gates(model, name, data[name], tokenizer, args, accelerator, adapter_name)
    return missing


def train_expert_gates(
    base_model: nn.Module,
    expert: Any,
    data: GateData,
    tokenizer: Any = None,
    args: Optional[GateTrainingArguments] = None,
    accelerator: Any = None,
    save: bool = True,
) -> dict[str, torch.Tensor]:
    """Train the gates of one expert (a Hub id, local folder or entry dict) on a base model.

    Only that expert is loaded, so memory is one expert's forward/backward whatever the library's size. With
    `save` and a local expert folder, the gates are written beside its adapter files as
    `glider_gates.safetensors`, where a Glider model built from the expert picks them up. The base model is
    returned to its original state (the temporary Glider layers are unloaded).
    """
    import os

    from peft import get_peft_model

    from ..config import GliderConfig, entry_path
    from ..expert_checks import UngatedExpertsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UngatedExpertsWarning)  # training them is what this does
        model = get_peft_model(base_model, GliderConfig(experts=[expert], top_k=1, alpha=0.0))
    try:
        entry = model.peft_config["default"].experts[0]
        gates = train_gates(model, entry["name"], data, tokenizer, args, accelerator)
    finally:
        model.unload()
    if save:
        folder = entry_path(entry)
        if not os.path.isdir(folder):
            raise ValueError(f"Expert {entry['name']!r} is not a local folder; save its gates with save_gates().")
        is_main = accelerator is None or accelerator.is_main_process
        if is_main:
            save_gates(gates, folder)
    return gates

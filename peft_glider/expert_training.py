"""Make a LoRA expert from data: PEFT LoRA training on (input, target) pairs or texts, saved atomically.

For trying Glider without published experts (the quickstart, the evaluation) and for growing a library;
experts made elsewhere work the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from .local_router.data import GateData, build_examples, collate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTrainingArguments:
    """How `train_lora_expert` trains: a LoRA of `rank` on `target_modules` of the top `top_layers` layers."""

    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    top_layers: Optional[int] = 10  # adapt only the top N decoder layers (None: all of them)
    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_length: int = 192
    seed: int = 0


def train_lora_expert(
    base_model: Any,
    tokenizer: Any,
    data: GateData,
    folder: Union[str, os.PathLike],
    args: Optional[LoraTrainingArguments] = None,
    name: Optional[str] = None,
) -> str:
    """Train a LoRA adapter on `data` (texts, or (input, target) pairs with the loss on targets) and save it in
    `folder` (written as `<folder>.partial` then renamed: a half-trained expert is never picked up). The base
    model's weights are not changed; it is left wrapped by PEFT, so pass a fresh copy per expert. Returns the folder.
    """
    args = args or LoraTrainingArguments()
    folder = Path(folder)
    name = name or folder.name
    layers = base_model.config.num_hidden_layers
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(args.target_modules),
        layers_to_transform=list(range(layers - args.top_layers, layers)) if args.top_layers else None,
    )
    torch.manual_seed(args.seed)
    model = get_peft_model(base_model, config)
    examples = build_examples(data, tokenizer, False, args.max_length)
    if not examples:
        raise ValueError(f"train_lora_expert: no training data for expert {name!r}.")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    for _ in tqdm(range(args.steps), desc=f"Training the {name} expert", mininterval=2):
        indices = torch.randint(len(examples), (args.batch_size,), generator=generator).tolist()
        loss = model(**collate([examples[i] for i in indices], pad, is_encoder_decoder=False)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    logger.info("Saved the %s expert (final loss %.3f) in %s", name, loss.item(), folder)
    return str(folder)

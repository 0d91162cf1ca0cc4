"""The model card of a Glider adapter: Hub metadata, the experts table, the router settings, usage.

Built with `huggingface_hub`'s `ModelCard` from the templates in `templates/` (Jinja, as the Hub's own card
templates). A card that already exists (written by the user, or on the Hub before a push) keeps its text and
metadata: its tags are extended and the Glider section, between HTML comment markers, is replaced.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from .config import GliderConfig
from .local_routers import local_router

if TYPE_CHECKING:
    from peft import PeftModel

TEMPLATES = Path(__file__).parent / "templates"
_SECTION = re.compile(r"<!-- peft-glider:start.*?<!-- peft-glider:end -->", re.DOTALL)
_CARD_FILE = "README.md"


def _cell(text: Any, limit: int = 300) -> str:
    """Text for one Markdown table cell: one line, no column breaks, at most `limit` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _modules(layout: dict[str, list]) -> str:
    """`{"model.layers.0.self_attn.q_proj": ...}` -> "q_proj, v_proj (4 modules)"."""
    kinds = Counter(name.rsplit(".", 1)[-1] for name in layout)
    return f"{', '.join(sorted(kinds))} ({len(layout)} modules)"


#: How the card names an expert's extras (the layout's entries after rank and scaling).
_EXTRA_NAMES = {"magnitude": "DoRA", "bias": "B bias"}


def _ranks(layout: dict[str, list]) -> str:
    """The expert's ranks, and its kind where it is not a plain LoRA, e.g. `4, 8 (DoRA)`."""
    ranks = ", ".join(str(rank) for rank in sorted({rank for rank, *_ in layout.values()}))
    extras = sorted({_EXTRA_NAMES[extra] for _, _, *found in layout.values() for extra in found if extra in _EXTRA_NAMES})
    return f"{ranks} ({', '.join(extras)})" if extras else ranks


def _expert_rows(config: GliderConfig, trained: dict[str, bool]) -> list[dict[str, str]]:
    rows = []
    for entry in config.experts:
        source = entry["source"] + (f" (subfolder `{entry['subfolder']}`)" if entry.get("subfolder") else "")
        if not local_router(config.local_router).learned:
            gates = f"— ({config.local_router})"
        else:
            gates = entry.get("gates", "set") if trained[entry["name"]] else "none (zeros: uninformed)"
        layout = entry.get("layout", {})
        rows.append({
            "name": _cell(entry["name"]),
            "source": _cell(source),
            "commit": f"`{entry['commit'][:12]}`" if entry.get("commit") else "local folder",
            "ranks": _ranks(layout),
            "modules": _modules(layout) if layout else "",
            "gates": _cell(gates),
            "instruction": _cell(entry.get("instruction", "—")),
        })
    return rows


def _alpha(config: GliderConfig) -> str:
    if config.alpha != "auto":
        return f"{config.alpha:g}"
    if config.auto_alpha_threshold is None:
        return "auto (threshold not calibrated yet)"
    return (
        f"auto: a query whose best global score reaches {config.auto_alpha_threshold:.3f} gets "
        f"{config.alpha_held_in:g}, others {config.alpha_held_out:g}"
    )


def _adapter_view(name: str, config: GliderConfig, trained: dict[str, bool]) -> dict[str, Any]:
    has_instructions = config.instruction_embedding_dim is not None
    writer = (config.instruction_writer or "unknown").split("@", 1)[0]  # an endpoint URL stays private
    router = local_router(config.local_router)
    return {
        "name": name,
        "experts": _expert_rows(config, trained),
        "top_k": config.top_k,
        "alpha": _alpha(config),
        "local_router": router.summary(config.arrow_temperature),
        "embedder": f"`{config.embedder}`" if config.embedder else "none (no instructions stored)",
        "weights": (
            "saved in this adapter (self-contained)" if config.save_expert_weights
            else "not saved: fetched from their sources at the pinned commits and checked against their tensor "
            "hashes (router-only adapter)"
        ),
        "gates_made": router.how_vectors_are_made(),
        "instructions_made": (
            f"written by `{writer}` from a few samples of each expert's task, embedded with `{config.embedder}`."
            if has_instructions
            else "none yet: routing is local only until `GlobalRouter.describe_experts(...)` writes them."
        ),
    }


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """`name_or_path` when it reads as a Hub id (not a local folder), else None: the Hub's `base_model` metadata
    takes ids only."""
    if not name_or_path or os.path.isdir(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def base_model_id(model: "PeftModel") -> Optional[str]:
    """The base model's id or path, as PEFT records it, or None when the model was built from a bare config."""
    for config in model.peft_config.values():
        if config.base_model_name_or_path:
            return config.base_model_name_or_path
    return _config_name_or_path(model) or None


def _config_name_or_path(model: "PeftModel") -> Optional[str]:
    """The base model's `_name_or_path` as its config records it (None for a model without a config)."""
    return getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)


def glider_card(model: "PeftModel", existing: Optional[ModelCard] = None, repo_id: Optional[str] = None,
                title: Optional[str] = None, extra_tags: Optional[list[str]] = None) -> ModelCard:
    """The model card of `model`'s Glider adapters: `existing` updated (its Glider section replaced), or a new one.

    `repo_id`: the Hub repository the card is for (its usage snippet and Hub-valid metadata); None for a local save.
    """
    from peft import PeftModelForCausalLM
    from peft import __version__ as peft_version
    from transformers import PreTrainedModel

    glider = model.base_model
    adapters = []
    for name, config in model.peft_config.items():
        if isinstance(config, GliderConfig):
            gates = glider.get_gates(name)
            trained = {expert: any(bool(g.any()) for g in per_module.values()) for expert, per_module in gates.items()}
            adapters.append(_adapter_view(name, config, trained))
    base = base_model_id(model)
    section = jinja2.Template((TEMPLATES / "glider_section.md").read_text(), keep_trailing_newline=True).render(
        adapters=adapters,
        base_model=base,
        repo_id=repo_id or "path/or/hub-id/of/this-adapter",
        embedder=next((c.embedder for c in model.peft_config.values() if c.instruction_embedding_dim), None),
        peft_version=peft_version,
        glider_version=version("peft-glider"),
    ).strip()

    data = existing.data if existing is not None else ModelCardData()
    data.library_name = "peft"
    # Saved locally, the metadata names the base as PEFT's own cards do (its `_name_or_path`, a folder included);
    # for the Hub (repo_id given), which takes model ids only, a local folder is named in the text alone.
    metadata_base = hub_model_id(base) if repo_id else _config_name_or_path(model)
    if metadata_base is not None:
        data.base_model = metadata_base
    tags = {"peft", "glider", "lora", *(data.tags or []), *(extra_tags or [])}
    if metadata_base:
        tags.add(f"base_model:adapter:{metadata_base}")
    if isinstance(model.get_base_model(), PreTrainedModel):
        tags.add("transformers")
    data.tags = sorted(tags)
    if not data.pipeline_tag and isinstance(model, PeftModelForCausalLM):
        data.pipeline_tag = "text-generation"

    if existing is None:
        return ModelCard.from_template(
            data, template_path=str(TEMPLATES / "model_card.md"), title=title or "Glider adapter",
            glider_section=section,
        )
    card = existing
    if _SECTION.search(card.text):
        card.text = _SECTION.sub(lambda _: section, card.text)
    else:
        card.text = card.text.rstrip() + "\n\n" + section + "\n"
    return card


def write_model_card(model: "PeftModel", folder: str, repo_id: Optional[str] = None,
                     extra_tags: Optional[list[str]] = None) -> None:
    """Write or update `README.md` in `folder` with the Glider card (atomically: no half-written card)."""
    path = os.path.join(folder, _CARD_FILE)
    existing = ModelCard.load(path) if os.path.exists(path) else None
    title = (repo_id or os.path.basename(os.path.normpath(folder))).split("/")[-1]
    card = glider_card(model, existing, repo_id=repo_id, title=title, extra_tags=extra_tags)
    partial = path + ".partial"
    card.save(partial)
    os.replace(partial, path)

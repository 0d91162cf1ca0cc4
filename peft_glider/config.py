"""`GliderConfig`: the PEFT config of a Glider adapter (a routed library of LoRA experts)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ._registration import GLIDER_NAME
from ._warnings import warn_user
from .local_routers import local_router

#: Bumped when the saved layout changes incompatibly; additive changes keep it.
FORMAT_VERSION = 1


def entry_path(entry: dict[str, Any]) -> str:
    """Where an expert entry points: its source, joined with its subfolder when it has one (a local folder, or a
    path inside a Hub repository)."""
    return os.path.join(entry["source"], entry["subfolder"]) if entry.get("subfolder") else entry["source"]


#: Keys a user may give in an expert entry.
USER_EXPERT_KEYS = ("source", "name", "revision", "subfolder")
#: Keys added when an expert is resolved (pinning it), described (its instruction text) or its gates are set
#: (how: "shipped" with the expert or "trained" here, see `GliderModel.set_gates`).
RESOLVED_EXPERT_KEYS = ("commit", "sha256", "layout", "instruction", "gates")

ExpertEntry = Union[str, dict[str, Any]]


def default_expert_name(source: str, subfolder: Optional[str] = None) -> str:
    """Name an expert after the last component of its source (and subfolder), e.g. `owner/math-lora` -> `math-lora`."""
    path = source.rstrip("/\\")
    if subfolder:
        path = f"{path}/{subfolder.strip('/')}"
    return os.path.basename(path) or path


def normalize_expert_entry(entry: ExpertEntry, position: int) -> dict[str, Any]:
    """Turn a user's expert entry (a string or a dict) into the canonical dict form, validating it."""
    if isinstance(entry, (str, os.PathLike)):
        entry = {"source": os.fspath(entry)}
    if not isinstance(entry, dict):
        raise TypeError(
            f"experts[{position}] must be a Hub id, a local folder or a dict with a 'source' key, "
            f"got {type(entry).__name__}."
        )
    unknown = set(entry) - set(USER_EXPERT_KEYS) - set(RESOLVED_EXPERT_KEYS)
    if unknown:
        raise ValueError(
            f"experts[{position}] has unknown key(s) {sorted(unknown)}; allowed: {list(USER_EXPERT_KEYS)}."
        )
    source = entry.get("source")
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ValueError(f"experts[{position}] needs a non-empty 'source' (a Hub id or a local folder).")
    normalized = dict(entry)
    normalized["source"] = os.fspath(source)  # as given: a relative folder stays relative (portable)
    name = normalized.get("name") or default_expert_name(os.fspath(source), normalized.get("subfolder"))
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"experts[{position}] has an empty name.")
    normalized["name"] = name
    return normalized


def check_adapter_name(adapter_name: str) -> None:
    """Refuse an adapter name PEFT's state dicts cannot carry: its filter drops keys containing
    ".{other_adapter}.", and "." or "/" break key parsing."""
    if not adapter_name or adapter_name.isdigit() or any(ch in adapter_name for ch in "./\\"):
        raise ValueError(
            f"Invalid Glider adapter name {adapter_name!r}: use a non-numeric name without '.', '/' or '\\'."
        )


@dataclass
class GliderConfig(PeftConfig):
    """Configuration of a Glider adapter: which LoRA experts to route among, and how.

    Routing at every adapted module and token (see `docs/algorithm.md`):
    `logit_e = LN(u) . LN(gate_e) / sqrt(d) + alpha * cos(q, g_e)`, the `top_k` largest logits are kept and
    their softmax weights the selected experts' LoRA deltas. Global scores `cos(q, g_e)` only exist inside
    `GliderModel.global_scores(...)`; without them routing is local only and `alpha` has no effect.

    Args:
        experts: The LoRA experts. Each is a Hub id, a local adapter folder, or a dict with `source` and
            optional `name`, `revision` and `subfolder`. The order fixes the routing index. When the model is
            built, each entry is completed with its resolved `commit`, a `sha256` of its tensors and its
            `layout` (adapted modules, ranks and scalings), which pins the expert in a saved adapter.
        top_k: Experts added per token and module (where fewer experts adapt a module, all of them are used).
        candidates: With global scores, each row's local routing at a module runs over only its `candidates`
            experts of best global score among those adapting the module (the hierarchy of a large library:
            the local router never touches the others). None (default), or at least the number of experts:
            every expert is scored. Rows without global scores (outside `route` / `global_scores`) score every
            expert.
        max_resident_experts: Hold the LoRA factors of at most this many experts in the layers (a budget for large
            libraries); the others stay in their files, read when a call's candidates need them (when `route` or
            `global_scores` is entered), the least recently used evicted. The gates follow the factors (the others'
            wait in a temporary file, `peft_glider.residency`); instruction embeddings stay in memory for every
            expert. The adapter is then router-only (`save_expert_weights` defaults to False:
            the factors are read from the experts' sources); for libraries larger than the budget it needs
            `candidates`: a call may need at most the budget (its rows' candidates at every module). None (default):
            every expert resident.
        alpha: Weight of the global (instruction) score against the local (gate) score. The paper used 100 when
            the query's task is among the experts' tasks and 3 otherwise. `"auto"` decides per row: a row whose
            best global score reaches `auto_alpha_threshold` gets `alpha_held_in`, the others `alpha_held_out`.
        alpha_held_in: The weight `alpha="auto"` gives a query that matches an expert's task.
        alpha_held_out: The weight `alpha="auto"` gives any other query.
        auto_alpha_threshold: Calibrated by `GlobalRouter.describe_experts` on the experts' own samples.
        embedder: Id of the sentence embedder of the instruction embeddings (set with them); a router with
            another embedder is refused.
        instruction_writer: What wrote the experts' instructions (the writer's id, set with them), for the card.
        local_router: `"phatgoose"`: learned gate vectors, scored `LN(u) . LN(gate) / sqrt(d)`. `"arrow"`:
            training-free prototypes (top right singular vector of each expert's `B A`), scored `|u . v| / T`.
        arrow_temperature: T of the Arrow scores.
        save_expert_weights: Save the experts' LoRA weights inside the Glider adapter (self-contained). When
            False, only the router is saved and the experts are fetched again from their sources on load. Default
            (None): True, or False under a `max_resident_experts` budget.
        train_expert_factors: Opt in to fine-tuning the experts' LoRA factors along with the gates (they become
            trainable parameters). Off by default: the factors are frozen buffers and only the router learns.
            Needs `save_expert_weights=True`, since trained factors no longer match their sources.
        target_modules: Filled in from the experts (union of the modules they adapt); not set by hand.
        instruction_embedding_dim: Dimension of the per-expert instruction embeddings, once they are set.
        format_version: Version of the saved layout.
    """

    experts: list[ExpertEntry] = field(default_factory=list, metadata={"help": "The LoRA experts to route among."})
    top_k: int = field(default=2, metadata={"help": "Experts selected per token and module."})
    candidates: Optional[int] = field(default=None, metadata={"help": "Experts scored locally per row (by global score)."})
    max_resident_experts: Optional[int] = field(default=None, metadata={"help": "Experts whose factors stay loaded."})
    alpha: Union[float, str] = field(default=3.0, metadata={"help": "Weight of the global score, or 'auto'."})
    alpha_held_in: float = field(default=100.0, metadata={"help": "alpha='auto': weight for held-in queries."})
    alpha_held_out: float = field(default=3.0, metadata={"help": "alpha='auto': weight for held-out queries."})
    auto_alpha_threshold: Optional[float] = field(default=None, metadata={"help": "alpha='auto': calibrated."})
    embedder: Optional[str] = field(default=None, metadata={"help": "Embedding model of the instructions."})
    instruction_writer: Optional[str] = field(default=None, metadata={"help": "What wrote the instructions."})
    local_router: str = field(default="phatgoose", metadata={"help": "Local router: phatgoose or arrow."})
    arrow_temperature: float = field(default=1.0, metadata={"help": "Temperature T of Arrow scores |u.v|/T."})
    save_expert_weights: Optional[bool] = field(
        default=None, metadata={"help": "Save expert weights with the adapter (default: unless under a budget)."}
    )
    train_expert_factors: bool = field(default=False, metadata={"help": "Also train the experts' LoRA factors."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Filled in from the experts."})
    instruction_embedding_dim: Optional[int] = field(default=None, metadata={"help": "Set with the embeddings."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of the saved layout."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(GLIDER_NAME)
        if not isinstance(self.experts, (list, tuple)) or not self.experts:
            raise ValueError("GliderConfig.experts is empty: give at least one LoRA expert.")
        self.experts = [normalize_expert_entry(entry, i) for i, entry in enumerate(self.experts)]
        names = [entry["name"] for entry in self.experts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"Duplicate expert name(s) {duplicates}: give each expert a unique 'name' in its entry."
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(names):
            raise ValueError(f"top_k must be an integer in [1, {len(names)}] (the number of experts), got {self.top_k!r}.")
        if self.candidates is not None and (
            isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < self.top_k
        ):
            raise ValueError(f"candidates must be None or an integer >= top_k={self.top_k}, got {self.candidates!r}.")
        budget = self.max_resident_experts
        if self.save_expert_weights is None:  # a budget reads the factors from their sources: router-only
            self.save_expert_weights = budget is None
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < max(self.top_k, self.candidates or 0):
                raise ValueError(
                    f"max_resident_experts must be None or an integer >= top_k and candidates, got {budget!r}."
                )
            if self.save_expert_weights:
                raise ValueError(
                    "max_resident_experts cannot be combined with save_expert_weights=True: the experts' factors are "
                    "read from their sources when needed, so the adapter saves the router only (leave "
                    "save_expert_weights unset, or set it to False)."
                )
        if self.alpha != "auto":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
                raise ValueError(f"alpha must be a number or 'auto', got {self.alpha!r}.")
            self.alpha = float(self.alpha)
        local_router(self.local_router)  # a ValueError lists the known ones
        if not isinstance(self.arrow_temperature, (int, float)) or not self.arrow_temperature > 0:
            raise ValueError(f"arrow_temperature must be a positive number, got {self.arrow_temperature!r}.")
        if self.train_expert_factors and not self.save_expert_weights:
            raise ValueError(
                "train_expert_factors=True needs save_expert_weights=True: trained factors no longer match the "
                "experts' sources, so they must be saved with the adapter."
            )
        if self.target_modules is not None:
            self.target_modules = sorted(self.target_modules)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This Glider adapter has format version {self.format_version}, newer than this peft-glider "
                f"understands ({FORMAT_VERSION}); upgrade peft-glider."
            )

    @property
    def expert_names(self) -> list[str]:
        """Expert names in routing order."""
        return [entry["name"] for entry in self.experts]

    @property
    def local_expert_names(self) -> list[str]:
        """Experts resolved from local folders (no Hub commit pins them): only this machine has them."""
        return [entry["name"] for entry in self.experts if "layout" in entry and entry.get("commit") is None]

    @property
    def unportable_experts(self) -> list[str]:
        """Experts this adapter needs from this machine's folders: a router-only adapter's local experts (a
        self-contained adapter carries every expert's weights)."""
        return [] if self.save_expert_weights else self.local_expert_names

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write `adapter_config.json`; warn when the adapter is router-only and needs local expert folders."""
        local = self.unportable_experts
        if local:
            warn_user(
                f"Saving a router-only Glider adapter (save_expert_weights=False) whose experts {local} are local "
                "folders: it loads only where those folders exist at the same paths. Build with "
                "save_expert_weights=True for a self-contained adapter."
            )
        super().save_pretrained(save_directory, **kwargs)

    @property
    def is_resolved(self) -> bool:
        """True once every expert entry carries its layout (the config of a built or saved Glider adapter)."""
        return all("layout" in entry for entry in self.experts)

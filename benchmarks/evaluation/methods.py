"""The compared methods: how each one's model is built over the same base model and expert library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from peft import ArrowConfig, LoraConfig, PeftModel, get_peft_model

from peft_glider import GliderConfig
from peft_glider.local_router import untrained_experts

TOP_K = 2
ORACLE = "Oracle expert"
RETRIEVAL = "Retrieval top-1"  # the global router's top expert for the whole query (LoraRetriever, LoRAuter)
# related held-out tasks: the expert of their family that scores best on their evaluated examples, picked in
# hindsight (with the evaluation's answers): what routing the whole task to one family expert could reach at most
FAMILY_BEST = "Best family expert (hindsight)"


@dataclass(frozen=True)
class GliderRow:
    """One GLIDER-family row of the table: the global-router source and alpha (0: Phatgoose, local only)."""

    name: str
    source: Optional[str]  # "llm", "samples", "endpoint"; None for Phatgoose
    alpha: Union[float, str]  # a number or "auto"


DEFAULT_SOURCE = "samples"  # peft_glider's offline default, `default_writer()`: the raw samples, no LLM
PHATGOOSE = GliderRow("Phatgoose (α=0)", None, 0.0)
GLIDER_HELD_IN = GliderRow("GLIDER α=100", DEFAULT_SOURCE, 100.0)  # the paper's alpha for held-in tasks
GLIDER_HELD_OUT = GliderRow("GLIDER α=3", DEFAULT_SOURCE, 3.0)  # ... and for held-out tasks
GLIDER_AUTO = GliderRow("GLIDER α=auto", DEFAULT_SOURCE, "auto")  # the offline default as a user meets it
GLIDER_ARROW = GliderRow("GLIDER α=auto · Arrow local", DEFAULT_SOURCE, "auto")  # no gate training


def glider_rows(sources: list[str]) -> list[GliderRow]:
    """Phatgoose; GLIDER with the default source at alpha 100, 3 and auto; every other source at auto."""
    rows = [PHATGOOSE] + ([GLIDER_HELD_IN, GLIDER_HELD_OUT, GLIDER_AUTO] if DEFAULT_SOURCE in sources else [])
    return rows + [GliderRow(f"GLIDER α=auto · {source}", source, "auto") for source in sources
                   if source != DEFAULT_SOURCE]


def single_expert_model(load_base: Callable[[], Any], folders: dict[str, str]) -> Any:
    """Every expert as a plain PEFT LoRA adapter named like its key in `folders`; `set_adapter(name)` picks the one
    that runs (the oracle: the task's own; retrieval: the global router's top-1)."""
    return _with_adapters(load_base, folders).eval()


def _with_adapters(load_base: Callable[[], Any], folders: dict[str, str]) -> Any:
    """A PeftModel holding every expert as a LoRA adapter named like its key in `folders`."""
    (first, folder), *rest = folders.items()
    model = PeftModel.from_pretrained(load_base(), folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model


def merged_model(load_base: Callable[[], Any], folders: dict[str, str]) -> Any:
    """All experts merged uniformly: delta W = (1/E) sum_e s_e B_e A_e, exact (PEFT's "cat" combination)."""
    names = list(folders)
    model = _with_adapters(load_base, folders)
    model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "uniform_merge", combination_type="cat")
    model.set_adapter("uniform_merge")
    for name in names:
        model.delete_adapter(name)
    return model.eval()


def arrow_model(load_base: Callable[[], Any], folders: dict[str, str]) -> Any:
    """PEFT's Arrow over the same experts and the same top-k.

    Built as `peft.create_arrow_model` builds it, plus the experts' `layers_to_transform` on the router adapter:
    peft's `create_arrow_model` (0.21.2, 0.22.0) puts the router on every layer, and a layer no expert adapts then
    fails (`torch.stack` of no prototypes) when experts adapt only some layers, as ours do.
    """
    names = [f"task_{i}" for i in range(len(folders))]  # create_arrow_model's adapter names
    model = _with_adapters(load_base, dict(zip(names, folders.values())))
    configs = [model.peft_config[name] for name in names]
    layers = {tuple(config.layers_to_transform or ()) for config in configs}
    if len(layers) != 1:
        raise ValueError(f"Arrow needs experts that adapt the same layers; these adapt {sorted(layers)}.")
    arrow = ArrowConfig(top_k=TOP_K, rng_seed=0)
    arrow.task_adapter_names, arrow.gks_adapter_names = names, []
    modules = sorted(set().union(*(config.target_modules for config in configs)))
    router = LoraConfig(arrow_config=arrow, target_modules=modules, r=configs[0].r,
                        layers_to_transform=configs[0].layers_to_transform)
    model.add_adapter(adapter_name="arrow_router", peft_config=router)
    model.set_adapter("arrow_router")
    return model.eval()


def glider_model(load_base: Callable[[], Any], folders: dict[str, str], local_router: str = "phatgoose",
                 candidates: Optional[int] = None) -> Any:
    """Our tuner over the experts named like their keys in `folders` (their trained gates ship in their folders,
    or Arrow prototypes computed from the weights), routing among each row's `candidates` best experts by global
    score when given; alpha is set per pass."""
    experts = [{"source": folder, "name": name} for name, folder in folders.items()]  # named by task
    config = GliderConfig(experts=experts, top_k=TOP_K, alpha="auto", local_router=local_router,
                          candidates=candidates)
    model = get_peft_model(load_base(), config)
    ungated = untrained_experts(model) if local_router == "phatgoose" else []
    if ungated:
        raise RuntimeError(f"Expert(s) {ungated} carry no trained gates: rebuild the library.")
    return model.eval()

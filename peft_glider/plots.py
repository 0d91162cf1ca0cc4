"""Pictures of routing: expert usage per layer (from `routing_trace()`) and global scores per prompt.

Needs matplotlib (the `plot` extra), imported here only. Figures are built with matplotlib's object API, not
pyplot, so drawing changes no global state (backend, current figure) of the user's process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .state import RoutingTrace

if TYPE_CHECKING:
    import os

    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('Routing pictures need matplotlib: pip install "peft-glider[plot]".') from error
    return Figure(figsize=(width, height), layout="constrained")


def _short(label: str, limit: int = 48) -> str:
    label = " ".join(label.split())
    return label if len(label) <= limit else label[: limit - 1] + "…"


def plot_layer_usage(
    trace: RoutingTrace,
    path: Optional[Union[str, "os.PathLike"]] = None,
    title: str = "Expert usage per layer",
    first_choice_only: bool = False,
) -> "Figure":
    """Heatmap of the share of each layer's expert selections going to each expert; saved to `path` if given."""
    layers, usage = trace.by_layer(first_choice_only)  # (L, E)
    if not layers:
        raise ValueError("The routing trace is empty: run the model inside `with glider.routing_trace() as trace:`.")
    figure = _figure(1.6 + 0.9 * len(trace.expert_names), 1.2 + 0.28 * len(layers))
    axes = figure.add_subplot()
    image = axes.imshow(usage.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(trace.expert_names)), trace.expert_names, rotation=30, ha="right")
    axes.set_yticks(range(len(layers)), [layer.rsplit(".", 1)[-1] if layer[-1].isdigit() else layer for layer in layers])
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of selections")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_global_scores(
    scores: torch.Tensor,
    prompts: Sequence[str],
    expert_names: Sequence[str],
    path: Optional[Union[str, "os.PathLike"]] = None,
    title: str = "Global scores (cosine)",
) -> "Figure":
    """Heatmap of the global scores (B, E), one row per prompt, with the values written in; saved to `path`."""
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(len(prompts), len(expert_names))
    label_width = 0.075 * max(len(_short(p)) for p in prompts)  # inches taken by the prompts on the left
    figure = _figure(1.5 + label_width + 1.0 * len(expert_names), 1.2 + 0.45 * len(prompts))
    axes = figure.add_subplot()
    axes.imshow(scores.numpy(), aspect="auto", cmap="magma")
    axes.set_xticks(range(len(expert_names)), list(expert_names), rotation=30, ha="right")
    axes.set_yticks(range(len(prompts)), [_short(p) for p in prompts])
    for row in range(scores.shape[0]):
        best = int(scores[row].argmax())
        for column in range(scores.shape[1]):
            weight = "bold" if column == best else "normal"
            axes.text(column, row, f"{scores[row, column]:.2f}", ha="center", va="center", color="cyan", weight=weight)
    axes.set_title(title)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure

"""The per-call routing contexts of one Glider adapter: global scores, routing by prompts, a routing trace.

Each context takes the library version the call routes with (the one an enclosing context of this call took,
else the current one) and keeps it, with what the call routes by, in the call's own state (`state.call_routing`):
per thread and asyncio task, restored on exit, never on the model. `GliderModel.global_scores`, `.route` and
`.routing_trace` are these, for the adapter they name.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch

from .config import GliderConfig
from .library import ExpertLibrary
from .routing import auto_alpha, candidate_experts
from .state import RoutingState, RoutingTrace, call_routing
from .versions import LibraryVersion

if TYPE_CHECKING:
    from .global_router import GlobalRouter, RouteInfo


class CallContexts:
    """The routing contexts of one adapter, over what the model holds for it.

    Args:
        config: The adapter's config (alpha settings, the embedder's id).
        state: The adapter's routing state (the key of the call's routing).
        library: The adapter's expert library (its versions and residency).
        embeddings: Reads the adapter's instruction embeddings as the model holds them now.
    """

    def __init__(
        self,
        config: GliderConfig,
        state: RoutingState,
        library: ExpertLibrary,
        embeddings: Callable[[], Optional[torch.Tensor]],
    ) -> None:
        self.config, self.state, self.library = config, state, library
        self._embeddings = embeddings
        self.router: Optional["GlobalRouter"] = None  # the one `route` uses when given none (`recorded_router`)

    def recorded_router(self) -> "GlobalRouter":
        """`router`, or else the router the adapter's config records (a shared adapter, loaded elsewhere), rebuilt
        on first use and kept."""
        if self.router is None:
            from .global_router import GlobalRouter

            self.router = GlobalRouter.recorded(self.config.instruction_writer, self.config.embedder)
        return self.router

    def current_version(self) -> LibraryVersion:
        """The current library version, republished first if the instruction embeddings were replaced behind the
        library's back (a checkpoint loaded with `assign=True`, a move to another device)."""
        versions = self.library.versions
        version = versions.current
        if version.embeddings is not self._embeddings():
            with versions.editing:  # an edit may be between setting the embeddings and publishing them
                embeddings = self._embeddings()
                if versions.current.embeddings is not embeddings:
                    versions.publish(embeddings=embeddings)
                version = versions.current
        return version

    def bare_call_version(self) -> LibraryVersion:
        """The version a call outside any routing context routes with: the current one, with every expert made
        resident first under a resident-experts budget (such a call scores them all; a gate-training call uses
        only the expert under training)."""
        version = self.current_version()
        residency = self.library.residency
        if residency.budget is None:
            return version
        call = self.state.current_call()
        training = None if call is None else call.gate_training_expert
        return residency.make_resident(None if training is None else [version.expert_names[training]])

    def call_version(self) -> LibraryVersion:
        """The version a call routes with: the one an enclosing context of this call took, else the current one
        (which the context about to be entered then keeps to its end)."""
        call = self.state.current_call()
        if call is not None and call.version is not None:
            return call.version
        return self.current_version()

    def global_scores(
        self, scores: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]] = None
    ) -> contextlib.AbstractContextManager[torch.Tensor]:
        """See `GliderModel.global_scores`."""
        return self._scores(self.call_version(), scores, alpha)

    @contextlib.contextmanager
    def _scores(
        self, version: LibraryVersion, scores: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]]
    ) -> Iterator[torch.Tensor]:
        """Route the calls inside with `version` and global scores `scores` (B, E) checked against its experts."""
        num_experts = version.num_experts
        scores = torch.as_tensor(scores)
        if scores.dim() == 1:
            scores = scores[None]
        if scores.dim() != 2 or scores.shape[1] != num_experts or scores.shape[0] == 0:
            raise ValueError(
                f"Global scores must have shape (batch, num_experts={num_experts}), got {tuple(scores.shape)}."
            )
        if not torch.isfinite(scores).all():
            raise ValueError("Global scores contain non-finite values.")
        scores = scores.detach().float().cpu()
        row_alpha = self._row_alpha(scores, alpha)
        residency = self.library.residency
        if residency.budget is not None:  # the call's candidates resident before it begins
            version = residency.make_resident(self._needed_experts(version, scores))
        with call_routing(self.state, version=version, row_bias=row_alpha[:, None] * scores, row_scores=scores):
            yield row_alpha

    def _needed_experts(self, version: LibraryVersion, scores: torch.Tensor) -> Optional[set[str]]:
        """The experts a call with these global scores (B, E) may route to: each row's candidates at every module
        (`routing.candidate_experts`, per set of experts present there), or None (all) without candidates."""
        m = self.state.candidates
        if m is None or m >= version.num_experts:
            return None
        needed, seen = set(), set()
        for snapshot in version.layers.values():
            present = snapshot.bank.present
            key = None if present is None else tuple(present.tolist())
            if key not in seen:
                seen.add(key)
                chosen = candidate_experts(scores, present, m)
                needed.update((chosen if present is None else chosen[present.cpu()[chosen]]).unique().tolist())
        return {version.expert_names[index] for index in needed}

    def _row_alpha(self, scores: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]]) -> torch.Tensor:
        """Per-row alpha (B,): the given one, the config's, or for `alpha="auto"` the calibrated rule's."""
        rows, config = scores.shape[0], self.config
        if alpha is not None:
            row_alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1).expand(rows).clone()
            if not torch.isfinite(row_alpha).all():
                raise ValueError("alpha must be finite.")
            return row_alpha
        if config.alpha != "auto":
            return torch.full((rows,), config.alpha)
        if config.auto_alpha_threshold is None:
            raise ValueError(
                "alpha='auto' needs a calibrated threshold: run GlobalRouter.describe_experts(...) or set "
                "config.auto_alpha_threshold."
            )
        return auto_alpha(scores, config.auto_alpha_threshold, config.alpha_held_in, config.alpha_held_out)

    @contextlib.contextmanager
    def route(
        self,
        prompts: Optional[Union[str, Sequence[str]]] = None,
        task_samples: Optional[Sequence] = None,
        router: Optional["GlobalRouter"] = None,
    ) -> Iterator["RouteInfo"]:
        """See `GliderModel.route`."""
        router = router or self.recorded_router()
        version = self.call_version()
        if version.embeddings is None:
            raise ValueError("The Glider adapter has no instruction embeddings: run describe_experts(...) first.")
        info = router.score(route_rows(prompts, task_samples), version.embeddings, self.config.embedder)
        with self._scores(version, info.scores, None) as row_alpha:
            info.alpha = row_alpha
            yield info

    @contextlib.contextmanager
    def trace(self) -> Iterator[RoutingTrace]:
        """See `GliderModel.routing_trace`."""
        version = self.call_version()
        trace = RoutingTrace(expert_names=list(version.expert_names))
        with call_routing(self.state, version=version, trace=trace):
            yield trace


def route_rows(prompts: Optional[Union[str, Sequence[str]]], task_samples: Optional[Sequence]) -> list[list]:
    """The samples each batch row is routed by: its own prompt (per query) or the task's samples (per task)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if task_samples is not None:
        if isinstance(task_samples, str):
            task_samples = [task_samples]
        return [list(task_samples)] * (len(prompts) if prompts else 1)
    if not prompts:
        raise ValueError("route() needs prompts (per-query routing) or task_samples (per-task routing).")
    return [[prompt] for prompt in prompts]

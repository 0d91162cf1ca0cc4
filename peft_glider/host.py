"""What an adapter's `ExpertLibrary` needs of the model it lives in (`library.LibraryHost`), given by the
`GliderModel` for one adapter: its layers, wrapping a module, retiring released layers, the base modules, where the
instruction embeddings are stored."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch
from peft.utils import _get_submodules
from torch import nn

from .layer import GliderLayer

if TYPE_CHECKING:
    from .model import GliderModel


class AdapterHost:
    """What an adapter's `ExpertLibrary` needs of the model (`library.LibraryHost`), for one adapter."""

    def __init__(self, glider: GliderModel, adapter_name: str) -> None:
        self.glider, self.adapter_name = glider, adapter_name

    def layers(self) -> dict[str, GliderLayer]:
        return self.glider.glider_layers(self.adapter_name)

    def wrap(self, module_name: str) -> GliderLayer:
        parent, target, target_name = _get_submodules(self.glider.model, module_name)
        self.glider._create_and_replace(
            self.glider.peft_config[self.adapter_name], self.adapter_name, target, target_name, parent, module_name
        )
        return _get_submodules(self.glider.model, module_name)[1]

    def retire(self, module_names: list[str], version_number: int) -> None:
        """Unwrap a released layer that holds no other adapter, else drop the adapter's last references there; a
        module the adapter adapts again (an expert added since), or released again later, is left alone."""
        adapter = self.adapter_name
        library = self.glider._libraries.get(adapter)
        with library.versions.editing if library is not None else contextlib.nullcontext():
            for module_name in module_names:
                try:
                    parent, layer, target_name = _get_submodules(self.glider.model, module_name)
                except AttributeError:
                    continue
                if not isinstance(layer, GliderLayer) or layer.released_in.get(adapter) != version_number:
                    continue
                if adapter in layer.glider_gates:  # adapted again since
                    continue
                for references in (layer.glider_versions, layer.glider_routing, layer.released_in):
                    references.pop(adapter, None)
                if not layer.glider_gates:
                    setattr(parent, target_name, layer.get_base_layer())

    def base_modules(self) -> dict[str, nn.Module]:
        return dict(self.glider.model.named_modules())

    def store_embeddings(self, embeddings: Optional[torch.Tensor]) -> None:
        self.glider.glider_instruction_embeddings[self.adapter_name] = embeddings

"""Expert I/O: resolve an expert source (local folder or Hub id), load its LoRA factors, validate, hash.

Everything that touches an expert's files lives here; the tuner only sees `LoadedExpert` objects.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import PeftConfig
from peft.utils import PeftType, load_peft_weights
from peft.utils.other import get_pattern_key

GATES_FILE = "glider_gates.safetensors"
_GATES_FORMAT = {"format": "glider-gates", "version": "1"}
_PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraFactors:
    """One expert's LoRA at one module: `delta(u) = scaling * B @ A @ u`."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoadedExpert:
    """An expert's LoRA factors per adapted module, with what pins it (resolved commit, tensor hash)."""

    name: str
    factors: dict[str, LoraFactors]  # module name (as in base_model.named_modules()) -> factors
    commit: Optional[str]
    sha256: str
    gates: Optional[dict[str, torch.Tensor]] = None  # module name -> trained gate (in_features,), if shipped

    @property
    def layout(self) -> dict[str, list]:
        """JSON-native layout saved in the config: module name -> [rank, scaling]."""
        return {module: [f.rank, f.scaling] for module, f in sorted(self.factors.items())}


def _resolve_folder(entry: dict[str, Any]) -> tuple[str, Optional[str]]:
    """Return (local folder holding the adapter files, resolved commit or None for local sources)."""
    source, subfolder = entry["source"], entry.get("subfolder")
    revision = entry.get("commit") or entry.get("revision")  # a saved adapter pins the commit it resolved
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        return folder, None
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(source, revision=revision, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - re-raised with the expert named
        raise OSError(
            f"Expert '{entry['name']}': could not resolve source {source!r} (revision {revision!r}) as a local "
            f"folder or a Hub repository: {err}"
        ) from err
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    return folder, os.path.basename(os.path.normpath(snapshot))


def tensor_sha256(factors: dict[str, LoraFactors]) -> str:
    """Hash an expert's tensors (not its files: re-saving the same tensors changes file bytes)."""
    digest = hashlib.sha256()
    for module in sorted(factors):
        f = factors[module]
        digest.update(module.encode())
        for tensor in (f.A, f.B):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
        digest.update(repr(float(f.scaling)).encode())
    return digest.hexdigest()


def _check_lora_config(name: str, config: PeftConfig) -> None:
    peft_type = getattr(config, "peft_type", None)
    if peft_type != PeftType.LORA:
        raise ValueError(f"Expert '{name}' is a {peft_type} adapter; Glider routes among LoRA adapters only.")
    unsupported = {
        "use_dora": bool(getattr(config, "use_dora", False)),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "fan_in_fan_out": bool(getattr(config, "fan_in_fan_out", False)),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "target_parameters": bool(getattr(config, "target_parameters", None)),
    }
    used = [key for key, on in unsupported.items() if on]
    if used:
        raise ValueError(f"Expert '{name}' uses LoRA option(s) {used}, which Glider does not support.")


def _scaling(config: PeftConfig, module: str, rank: int) -> float:
    alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    lora_alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    return lora_alpha / math.sqrt(rank) if config.use_rslora else lora_alpha / rank


def _split_factors(name: str, config: PeftConfig, state: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    a_factors, b_factors = {}, {}
    for key, tensor in state.items():
        module = key.removeprefix(_PEFT_PREFIX)
        if module.endswith(_LORA_A):
            a_factors[module.removesuffix(_LORA_A)] = tensor
        elif module.endswith(_LORA_B):
            b_factors[module.removesuffix(_LORA_B)] = tensor
        else:
            raise ValueError(
                f"Expert '{name}' has tensor {key!r}, which is not a LoRA A/B factor of a linear layer "
                "(embedding, convolution and bias adapters are not supported)."
            )
    if set(a_factors) != set(b_factors):
        missing = sorted(set(a_factors) ^ set(b_factors))
        raise ValueError(f"Expert '{name}' lacks an A or B factor for module(s) {missing}.")
    if not a_factors:
        raise ValueError(f"Expert '{name}' holds no LoRA weights.")
    factors = {}
    for module, A in a_factors.items():
        B = b_factors[module]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"Expert '{name}', module '{module}': LoRA factors of shapes A {tuple(A.shape)} and "
                f"B {tuple(B.shape)} do not chain."
            )
        factors[module] = LoraFactors(A=A, B=B, scaling=_scaling(config, module, A.shape[0]))
    return factors


def load_expert(entry: dict[str, Any]) -> LoadedExpert:
    """Load one normalized expert entry (see `GliderConfig`) through PEFT's own loaders."""
    name = entry["name"]
    folder, commit = _resolve_folder(entry)
    try:
        config = PeftConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - re-raised with the expert named
        raise OSError(f"Expert '{name}': no readable PEFT adapter config in {folder!r}: {err}") from err
    _check_lora_config(name, config)
    state = load_peft_weights(folder, device="cpu")
    factors = _split_factors(name, config, state)
    gates = load_gates(folder, name, factors)
    return LoadedExpert(name=name, factors=factors, commit=commit, sha256=tensor_sha256(factors), gates=gates)


def save_gates(gates: dict[str, torch.Tensor], folder: str | os.PathLike) -> str:
    """Write an expert's trained gates as `glider_gates.safetensors` in `folder` (atomically); return the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, GATES_FILE)
    partial = path + ".partial"
    save_file({module: gate.detach().float().contiguous().cpu() for module, gate in gates.items()}, partial, _GATES_FORMAT)
    os.replace(partial, path)
    return path


def load_gates(folder: str, name: str, factors: dict[str, LoraFactors]) -> Optional[dict[str, torch.Tensor]]:
    """Read the gates an expert carries beside its adapter files, or None; checked against its modules."""
    path = os.path.join(folder, GATES_FILE)
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != _GATES_FORMAT["format"]:
            raise ValueError(f"Expert '{name}': {path} is not a Glider gates file.")
        gates = {key: handle.get_tensor(key) for key in handle.keys()}
    for module, gate in gates.items():
        if module not in factors:
            raise ValueError(f"Expert '{name}': {GATES_FILE} has a gate for module '{module}', which it does not adapt.")
        if gate.shape != (factors[module].A.shape[1],):
            raise ValueError(
                f"Expert '{name}': gate for '{module}' has shape {tuple(gate.shape)}, "
                f"expected ({factors[module].A.shape[1]},)."
            )
    missing = sorted(set(factors) - set(gates))
    if missing:
        raise ValueError(f"Expert '{name}': {GATES_FILE} lacks gates for module(s) {missing[:3]}...")
    return gates

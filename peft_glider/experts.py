"""Expert I/O: resolve an expert source (local folder or Hub id), load its LoRA factors, validate, hash.

Everything that touches an expert's files lives here; the tuner only sees `LoadedExpert` objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from peft import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType, load_peft_weights
from peft.utils.other import get_pattern_key

from .config import entry_path
from .hub import GATES_FILE, download_adapter

_GATES_FORMAT = {"format": "glider-gates", "version": "1"}
_PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


class LoraFactors:
    """One expert's LoRA at one module: `delta(u) = scaling * B @ A @ u`.

    The factors are given as tensors, or as shapes plus a `loader` that reads them on first access: a Glider model
    is built one module at a time, so only that module's factors need to be in memory at once.
    """

    def __init__(
        self,
        A: Optional[torch.Tensor] = None,  # (r, in_features)
        B: Optional[torch.Tensor] = None,  # (out_features, r)
        scaling: float = 1.0,
        *,
        shapes: Optional[tuple[tuple[int, int], tuple[int, int]]] = None,  # (A shape, B shape) when lazy
        loader: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None,
        origin: Optional[tuple[str, str]] = None,  # where A and B are read from, for error messages
    ) -> None:
        if (A is None) != (B is None) or (A is None) == (loader is None):
            raise ValueError("LoraFactors takes A and B, or shapes and a loader.")
        self._A, self._B, self._loader, self.scaling = A, B, loader, scaling
        self.origin = origin or ("A", "B")
        a_shape, b_shape = (tuple(A.shape), tuple(B.shape)) if A is not None else shapes
        self.rank, self.in_features = a_shape
        self.out_features = b_shape[0]

    def unloaded(self) -> "LoraFactors":
        """Lazy factors: a copy that reads them on first access and holds them alone (self when given as tensors)."""
        if self._loader is None:
            return self
        shapes = ((self.rank, self.in_features), (self.out_features, self.rank))
        return LoraFactors(scaling=self.scaling, shapes=shapes, loader=self._loader, origin=self.origin)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), read from their source when lazy, without keeping them here."""
        return (self._A, self._B) if self._loader is None else self._loader()

    def _load(self) -> None:
        if self._A is None:
            self._A, self._B = self._loader()

    @property
    def A(self) -> torch.Tensor:
        self._load()
        return self._A

    @property
    def B(self) -> torch.Tensor:
        self._load()
        return self._B


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

    @property
    def pins(self) -> dict[str, Any]:
        """What a config entry records to pin this expert: resolved commit, tensor hash and layout."""
        return {"commit": self.commit, "sha256": self.sha256, "layout": self.layout}


class SafetensorsReader:
    """Reads single tensors of a safetensors file by plain file reads, as private copies.

    `safe_open` hands out tensors backed by a memory map of the whole file; while any of them lives, the pages it
    touched count in the process's resident memory on top of the copies a Glider layer makes, which nearly
    doubled the peak memory of building a model from many experts. Format: an 8-byte little-endian header
    length, a JSON header `{name: {dtype, shape, data_offsets}}`, then the data.
    """

    _DTYPES = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))  # a cut header fails to parse (ValueError)
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_size
        data_size = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        file_size = os.path.getsize(path)
        if self._data_start + data_size > file_size:
            raise ValueError(f"the file has {file_size} bytes, its header describes {self._data_start + data_size}")
        self.keys = list(header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        data = bytearray(end - start)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + start)
            if handle.readinto(data) != len(data):
                raise OSError(f"{self.path}: tensor '{key}' is truncated.")
        if not data:
            return torch.empty(self.shape(key), dtype=self._DTYPES[entry["dtype"]])
        return torch.frombuffer(data, dtype=self._DTYPES[entry["dtype"]]).reshape(self.shape(key))


def _resolve_folder(entry: dict[str, Any]) -> tuple[str, Optional[str]]:
    """Return (local folder holding the adapter files, resolved commit or None for local sources)."""
    source, subfolder = entry["source"], entry.get("subfolder")
    if os.path.isdir(source):
        folder = entry_path(entry)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise OSError(f"Expert '{entry['name']}': local folder {folder!r} has no {CONFIG_NAME}: not a PEFT adapter.")
        return folder, None
    revision = entry.get("commit") or entry.get("revision")  # a saved adapter pins the commit it resolved
    return download_adapter(source, revision, subfolder, what=f"Expert '{entry['name']}'")


def tensor_sha256(factors: Mapping[str, LoraFactors], name: str = "expert") -> str:
    """Hash an expert's tensors (not its files: re-saving the same tensors changes file bytes), and refuse
    non-finite values found in the same pass: a NaN or an inf in one factor would turn every token routed to the
    expert NaN. The error names the expert (`name`), the tensor and its file.

    Lazy factors are read one module at a time and not kept. The pass adds one sum per tensor (a NaN or an inf makes
    the total non-finite); only then are the tensors read again to name the culprit.
    """
    digest = hashlib.sha256()
    total = 0.0
    for module in sorted(factors):
        f = factors[module]
        digest.update(module.encode())
        for tensor in f.read():
            values = tensor.detach().to(torch.float32).contiguous().numpy()
            total += values.sum()
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(values)  # the buffer itself: the bytes tobytes() would copy
        digest.update(repr(float(f.scaling)).encode())
    if not math.isfinite(total):
        _refuse_non_finite(factors, name)
    return digest.hexdigest()


def _refuse_non_finite(factors: Mapping[str, LoraFactors], name: str) -> None:
    """Raise naming the first factor holding a NaN or an inf (none: the sum overflowed on finite values)."""
    for module in sorted(factors):
        for tensor, origin in zip(factors[module].read(), factors[module].origin):
            finite = torch.isfinite(tensor)
            if not finite.all():
                raise ValueError(
                    f"Expert '{name}': {origin} holds {int((~finite).sum())} non-finite value(s) (NaN or inf) at "
                    f"module '{module}'; every token routed to it would turn NaN. Fix or retrain the expert."
                )


def _check_lora_config(name: str, config: PeftConfig) -> None:
    peft_type = getattr(config, "peft_type", None)
    if peft_type != PeftType.LORA:
        kind = getattr(peft_type, "value", peft_type)
        raise ValueError(f"Expert '{name}' is a PEFT adapter of type {kind}; Glider routes among LoRA adapters only.")
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


def _module_keys(name: str, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Module name -> (key of its A factor, key of its B factor), from a PEFT LoRA checkpoint's keys."""
    a_keys, b_keys = {}, {}
    for key in keys:
        module = key.removeprefix(_PEFT_PREFIX)
        if module.endswith(_LORA_A):
            a_keys[module.removesuffix(_LORA_A)] = key
        elif module.endswith(_LORA_B):
            b_keys[module.removesuffix(_LORA_B)] = key
        else:
            raise ValueError(
                f"Expert '{name}' has tensor {key!r}, which is not a LoRA A/B factor of a linear layer "
                "(embedding, convolution and bias adapters are not supported)."
            )
    if set(a_keys) != set(b_keys):
        missing = sorted(set(a_keys) ^ set(b_keys))
        raise ValueError(f"Expert '{name}' lacks an A or B factor for module(s) {missing}.")
    if not a_keys:
        raise ValueError(f"Expert '{name}' holds no LoRA weights.")
    return {module: (a_keys[module], b_keys[module]) for module in a_keys}


def _factors(
    name: str,
    config: PeftConfig,
    keys: dict[str, tuple[str, str]],
    shape: Callable[[str], tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    path: str,
) -> dict[str, LoraFactors]:
    """Lazy factors per module, checked to chain, reading tensors through `read` when a layer needs them; `path`
    is the checkpoint file they come from (named in errors)."""
    factors = {}
    for module, (a_key, b_key) in keys.items():
        a_shape, b_shape = tuple(shape(a_key)), tuple(shape(b_key))
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(
                f"Expert '{name}', module '{module}': LoRA factors of shapes A {a_shape} and B {b_shape} do not chain."
            )
        factors[module] = LoraFactors(
            scaling=_scaling(config, module, a_shape[0]),
            shapes=(a_shape, b_shape),
            loader=lambda a_key=a_key, b_key=b_key: (read(a_key), read(b_key)),
            origin=(f"tensor '{a_key}' of {path}", f"tensor '{b_key}' of {path}"),
        )
    return factors


def load_expert(entry: dict[str, Any], hash_tensors: bool = True) -> LoadedExpert:
    """Resolve one normalized expert entry (see `GliderConfig`) and describe its factors, read lazily.

    Safetensors checkpoints are read tensor by tensor when a layer is built; others through PEFT's own loader.
    With `hash_tensors=False` an entry that pins a hash is taken at its word and no factor is read here: whoever
    reads the factors later checks them against that hash (a resident-experts budget does, on first use).
    """
    name = entry["name"]
    folder, commit = _resolve_folder(entry)
    try:
        config = PeftConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - re-raised with the expert named
        raise OSError(f"Expert '{name}': no readable PEFT adapter config in {folder!r}: {err}") from err
    _check_lora_config(name, config)
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.exists(weights):
        try:
            reader = SafetensorsReader(weights)
        except (OSError, ValueError, KeyError) as err:  # a short read, a cut header or cut data
            raise OSError(
                f"Expert '{name}': {weights} is truncated or not a safetensors file ({err}): delete it (for a Hub "
                "expert, its entry in the Hub cache) and download it again."
            ) from err
        factors = _factors(name, config, _module_keys(name, reader.keys), reader.shape, reader.read, weights)
    else:
        state = load_peft_weights(folder, device="cpu")
        path = os.path.join(folder, WEIGHTS_NAME)
        keys = _module_keys(name, list(state))
        factors = _factors(name, config, keys, lambda k: state[k].shape, state.__getitem__, path)
    gates = load_gates(folder, name, factors)
    sha256 = tensor_sha256(factors, name) if hash_tensors or "sha256" not in entry else entry["sha256"]
    return LoadedExpert(name=name, factors=factors, commit=commit, sha256=sha256, gates=gates)


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
        if gate.shape != (factors[module].in_features,):
            raise ValueError(
                f"Expert '{name}': gate for '{module}' has shape {tuple(gate.shape)}, "
                f"expected ({factors[module].in_features},)."
            )
    missing = sorted(set(factors) - set(gates))
    if missing:
        raise ValueError(f"Expert '{name}': {GATES_FILE} lacks gates for module(s) {missing[:3]}...")
    return gates

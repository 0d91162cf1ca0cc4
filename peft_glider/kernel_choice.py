"""Which kernel runs a call: on CPU a cost model fitted on 2 cores (`kernel_costs`), on CUDA a conservative rule
(`choose_kernel_cuda`), remembered per bank in a bounded `KernelChoices`; a forced kernel where it can run
(`resolve_kernel`)."""

from __future__ import annotations

import threading
import weakref

import torch

from .bank import ExpertBank
from .lru import LRUCache
from .kernels import _TRITON_DTYPES, KERNEL_FUNCTIONS, KERNELS, triton_available

# Cost model of the kernels on CPU, in microseconds, fitted to measurements on 2 cores (docs/benchmarks.md):
# a fixed cost per call, then multiply-adds at a kernel's rate, and for `concat` the pass over all its factors.
_FIXED_US = {"concat": 25.0, "gather": 30.0, "sparse": 100.0, "native": 8.0}
_MACS_PER_US = {"concat": 50e3, "gather": 0.8e3, "sparse": 12e3, "native": 20e3}  # gather: the rate of copying
_FACTOR_READS_PER_US = 8e3
_SPARSE_DTYPES = (torch.float32, torch.float64)


def runnable_kernels(bank: ExpertBank, dtype: torch.dtype, needs_grad: bool = False) -> tuple[str, ...]:
    """The kernels that can run a call: `native` needs its compiled library, contiguous float32 factors on CPU,
    float32 tokens and no gradients;
    `gather` and `sparse` need a rank shared by the experts present; `sparse` needs float32/64 and no gradients
    (torch's SDDMM backward disagreed with the dense products in our tests)."""
    kernels = ["concat"]
    if bank.uniform_rank is not None:
        kernels.append("gather")
        if dtype in _SPARSE_DTYPES and not needs_grad:
            kernels.append("sparse")
    if bank.native_ready and dtype == torch.float32 and not needs_grad:
        kernels.append("native")
    if dtype in _TRITON_DTYPES and not needs_grad and bank.A.dtype == bank.BT.dtype and triton_available(bank.A.device):
        kernels.append("triton")
    return tuple(kernels)


def kernel_costs(
    num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool = False
) -> dict[str, float]:
    """Modelled time of each kernel that can run this call (`runnable_kernels`) on CPU, in microseconds."""
    width = bank.A.shape[1] + bank.BT.shape[1]  # d + o
    total_rank = bank.A.shape[0]
    costs = {}
    for kernel in runnable_kernels(bank, dtype, needs_grad):
        if kernel == "triton":  # a GPU kernel (on CPU only under Triton's interpreter, never picked by "auto")
            continue
        if kernel == "concat":
            macs = num_tokens * total_rank * width
            costs[kernel] = _FIXED_US[kernel] + macs / _MACS_PER_US[kernel] + total_rank * width / _FACTOR_READS_PER_US
        else:  # only the selected experts' products
            macs = num_tokens * k * bank.max_rank * width
            costs[kernel] = _FIXED_US[kernel] + macs / _MACS_PER_US[kernel]
    return costs


#: On CUDA, below this many concatenated rank rows, `concat`'s two GEMMs over every expert are launch-bound and
#: cost no more than the grouped kernel's sort and schedule (a conservative rule, not yet fitted on a GPU).
CUDA_CONCAT_MAX_RANK_ROWS = 256


def choose_kernel_cuda(bank: ExpertBank, dtype: torch.dtype, needs_grad: bool) -> str:
    """The documented rule for CUDA (docs/routing.md): `concat` for small libraries or with gradients, else the
    grouped Triton kernel, else `gather` (it reads only the selected experts)."""
    kernels = runnable_kernels(bank, dtype, needs_grad)
    if bank.A.shape[0] <= CUDA_CONCAT_MAX_RANK_ROWS:
        return "concat"
    if "triton" in kernels:
        return "triton"
    return "gather" if "gather" in kernels else "concat"


def token_bucket(num_tokens: int) -> int:
    """The power of two at or above `num_tokens`: kernel choices are made per bucket of token counts."""
    return 1 << max(num_tokens - 1, 0).bit_length()


class KernelChoices(LRUCache):
    """A bounded memory of kernel choices per call shape: token counts bucketed to powers of two, least recently
    used entries dropped past `capacity` (one entry per prompt length would grow without bound)."""

    def __init__(self, capacity: int = 64) -> None:
        super().__init__(capacity)

    @staticmethod
    def key(num_tokens: int, k: int, dtype: torch.dtype, needs_grad: bool, device_type: str) -> tuple:
        return (token_bucket(num_tokens), k, dtype, needs_grad, device_type)


_CHOICES: "weakref.WeakKeyDictionary[ExpertBank, KernelChoices]" = weakref.WeakKeyDictionary()
_CHOICES_LOCK = threading.Lock()


def choices_for(bank: ExpertBank) -> KernelChoices:
    """The kernel choices remembered for `bank` (made on first use, freed with the bank)."""
    choices = _CHOICES.get(bank)
    if choices is None:
        with _CHOICES_LOCK:
            choices = _CHOICES.setdefault(bank, KernelChoices())
    return choices


def choose_kernel(num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool = False) -> str:
    """The kernel for this call, by device: on CPU the cheapest by `kernel_costs` (at the bucket's token count),
    on CUDA `choose_kernel_cuda`'s rule. Remembered per bank in a bounded `KernelChoices`."""
    device_type = bank.A.device.type
    key = KernelChoices.key(num_tokens, k, dtype, needs_grad, device_type)
    choices = choices_for(bank)
    choice = choices.get(key)
    if choice is None:
        if device_type == "cuda":
            choice = choose_kernel_cuda(bank, dtype, needs_grad)
        else:
            costs = kernel_costs(key[0], bank, k, dtype, needs_grad)
            choice = min(costs, key=costs.get)
        choices.put(key, choice)
    return choice


def resolve_kernel(
    kernel: str, num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool
) -> str:
    """The kernel a call runs: `choose_kernel`'s for "auto", a forced one where it can run, else `concat`."""
    if kernel == "auto":
        return choose_kernel(num_tokens, bank, k, dtype, needs_grad)
    if kernel not in KERNEL_FUNCTIONS:
        raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
    return kernel if kernel in runnable_kernels(bank, dtype, needs_grad) else "concat"

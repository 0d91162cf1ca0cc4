"""Makes vLLM's CPU build pick Model Runner V2 on a machine without triton-cpu (tests/test_vllm.py, V2 runs).

vLLM runs V2 where Triton reports an active driver; the registry serves no Triton with a CPU backend, so this
registers a stub one whose driver says it is active (it compiles nothing: with TRITON_INTERPRET=1 Triton's
interpreter runs vLLM's kernels). On PYTHONPATH, it runs in every process vLLM starts (API server, engine core,
workers), before vLLM imports Triton.
"""

try:
    from triton.backends import Backend, backends
    from triton.backends.driver import DriverBase

    class _ActiveCPUDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError

        def get_current_target(self):
            raise NotImplementedError

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

    backends.setdefault("cpu", Backend(compiler=None, driver=_ActiveCPUDriver))
except ImportError:  # no Triton: vLLM runs its V1 runner
    pass

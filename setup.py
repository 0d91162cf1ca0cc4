"""Build of the optional compiled kernel; everything else is declared in pyproject.toml.

The kernel is plain C (no Python or torch headers), loaded by `peft_glider/native.py` through ctypes. Where no C
compiler is found the build is skipped and the pure-torch kernels run instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "peft_glider._selected_experts",
            sources=["peft_glider/csrc/selected_experts.c"],
            extra_compile_args=["-O3", "-std=c11", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        )
    ]
)

"""Builds the optional C++/CUDA extension ``minc_kernels._C``; metadata is in pyproject.toml.

The extension is built only when torch is importable in the build environment
(``pip install --no-build-isolation .``).  Without torch, or if the build fails
and ``MINC_KERNELS_BUILD_EXT`` is not ``1``, the package installs as pure Python
and ``ema_update_`` falls back to ``torch._foreach_lerp_``.
"""
from setuptools import setup

setup()

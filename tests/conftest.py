"""Fixtures shared by every test module: a fresh redis-server per test (``redis_srv``).

Without a GPU the Triton kernels run through Triton's interpreter. Whether a ``@triton.jit``
function is interpreted is fixed when the triton package is first imported, and transformers
imports it early, so the switch is set here, before any test module is imported: test order
cannot matter. Only code that hands CPU tensors to :mod:`kvhead.kernels` itself (the kernel
tests) takes the interpreted path; the runner and policy choose the kernels on CUDA only.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from redis_server import redis_srv  # noqa: F401  (registers the fixture for this directory)

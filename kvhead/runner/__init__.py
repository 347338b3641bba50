"""Reference runner: Hugging Face Llama-family models with kvhead's paged, head-aware attention."""

from kvhead.runner.hf_runner import ReferenceRunner
from kvhead.runner.paged_cache import PagedKVCache

__all__ = ["PagedKVCache", "ReferenceRunner"]

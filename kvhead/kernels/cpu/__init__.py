"""The vLLM plugin's C++ CPU kernels (decode step, rerank, writes), compiled on first use.

Dependency rule: imports ``kvhead.models.store`` (where builds are cached) and nothing else of
ours.
"""

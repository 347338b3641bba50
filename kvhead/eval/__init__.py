"""Evaluation: the Hugging Face reference runner over a vLLM-layout paged cache, the accuracy
harness (agreement, perplexity, KL, passkeys on the shipped corpora), the head profiler and
the coverage probe.

Dependency rule: sits above ``kvhead.core`` and ``kvhead.kernels``; never imports the vLLM
plugin (``kvhead.vllm``) or ``kvstore``.
"""

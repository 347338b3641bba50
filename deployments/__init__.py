"""kvhead served: the Ray Serve LLM application (OpenAI HTTP, vLLM replicas with FlexiCache).

Dependency rule: the top of the stack. Builds on ``ray.serve.llm`` and the vLLM plugin
(:mod:`kvhead.vllm`); only the CLI imports it.
"""

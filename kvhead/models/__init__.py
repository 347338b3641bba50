"""Model provisioning (pull, convert, cache) and tiny random test models.

``resolve_model(spec)`` turns a registry name, a Hugging Face folder or a ``.gguf`` file into a
local bf16 Hugging Face folder; ``kvhead.models.tiny.build_tiny_llama`` writes a random test model.
"""

from kvhead.models.errors import ModelError
from kvhead.models.resolve import pull, resolve_model

__all__ = ["ModelError", "pull", "resolve_model"]

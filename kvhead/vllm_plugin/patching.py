"""Wrapping a vLLM method once per process, for the few hooks vLLM 0.32 does not offer.

The plugin changes two decisions vLLM makes without asking the attention backend (which layers
hold how many KV heads; how much of the KV budget the cache may take), so it wraps the methods
that make them. Workers import the plugin more than once per process (engine core, model
runner), so every wrapper carries a marker and a second install is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "_kvhead_wrapped"


def wrap_once(owner: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
              ) -> bool:
    """Replace ``owner.name`` with ``wrap(original)`` unless this process already did.

    Returns whether it wrapped now (callers install companion patches only then).
    """
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return False
    wrapped = wrap(original)
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)
    return True


def adjust_result(owner: type, name: str, adjust: Callable[[Any, Any, Any], Any]) -> bool:
    """Make ``owner.name`` return ``adjust(self, result, runtime)`` of its own result while this
    process has a FlexiCache runtime (unchanged otherwise), once per process."""
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def adjusted(self, *args: Any, **kwargs: Any) -> Any:
            from kvhead.vllm_plugin.runtime import current

            result = original(self, *args, **kwargs)
            runtime = current()
            return result if runtime is None else adjust(self, result, runtime)

        return adjusted

    return wrap_once(owner, name, wrap)

"""kvhead FlexiCache as a vLLM plugin (``vllm.general_plugins`` entry point ``kvhead``).

Enable it with one option plus settings::

    --attention-backend CUSTOM --no-enable-prefix-caching --block-size 16 \\
    --additional-config '{"kvhead": {"profile": "profile.json", "top_k": 64, "rerank_interval": 16}}'

vLLM calls :func:`register` in every process it starts, so it does nothing costly: it points
vLLM's ``CUSTOM`` backend slot at :class:`~kvhead.vllm_plugin.backend.FlexiCacheBackend` (a
class path, imported only if a run selects CUSTOM) and, on vLLM's CPU platform, which otherwise
ignores ``--attention-backend``, lets an explicit CUSTOM choice through. Runs that do not ask for
CUSTOM are untouched.
"""

from __future__ import annotations

BACKEND_PATH = "kvhead.vllm_plugin.backend.FlexiCacheBackend"


def register() -> None:
    """vLLM plugin hook: make ``--attention-backend CUSTOM`` mean kvhead FlexiCache."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        return  # another plugin owns CUSTOM; leave it alone
    register_backend(custom, BACKEND_PATH)
    if current_platform.is_cpu():
        _honour_custom_on_cpu(type(current_platform))


def _honour_custom_on_cpu(platform_cls: type) -> None:
    """Wrap the CPU platform's backend choice so an explicit CUSTOM is not replaced by CPU_ATTN."""
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "_kvhead_wrapped", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._kvhead_wrapped = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)

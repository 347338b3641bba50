"""kvhead FlexiCache as a vLLM plugin (``vllm.general_plugins`` entry point ``kvhead``).

Enable it with one option plus settings (a preset of :mod:`kvhead.presets`, or its options)::

    --attention-backend CUSTOM --no-enable-prefix-caching --block-size 16 \\
    --additional-config '{"kvhead": {"preset": "accurate"}}'

vLLM calls :func:`register` in every process it starts, so it does nothing costly: it points
vLLM's ``CUSTOM`` backend slot at :class:`~kvhead.vllm.backend.FlexiCacheBackend` (a
class path, imported only if a run selects CUSTOM) and, on vLLM's CPU platform, which otherwise
ignores ``--attention-backend``, lets an explicit CUSTOM choice through. Runs that do not ask for
CUSTOM are untouched. It also registers the ``KVHeadConnector`` KV connector
(:mod:`kvhead.vllm.connector`, cross-replica prefix reuse through Redis). Every change to
vLLM's internals lives in :mod:`kvhead.vllm.patches`.

Dependency rule: the top of the stack beside ``kvhead.eval``: imports ``kvhead.core``,
``kvhead.kernels.cpu`` and ``kvstore``; nothing imports it but the CLI and tools.
"""

from __future__ import annotations

BACKEND_PATH = "kvhead.vllm.backend.FlexiCacheBackend"


def register() -> None:
    """vLLM plugin hook: make ``--attention-backend CUSTOM`` mean kvhead FlexiCache."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        return  # another plugin owns CUSTOM; leave it alone
    register_backend(custom, BACKEND_PATH)
    if current_platform.is_cpu():
        from kvhead.vllm.patches import honour_custom_backend_on_cpu

        honour_custom_backend_on_cpu(type(current_platform))
    _register_connector()


def _register_connector() -> None:
    """Make ``--kv-transfer-config '{"kv_connector": "KVHeadConnector", ...}'`` mean
    :class:`~kvhead.vllm.connector.KVHeadConnector` (a lazy class path, as vLLM's own)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(
            "KVHeadConnector", "kvhead.vllm.connector", "KVHeadConnector"
        )
    except ValueError:  # registered already in this process
        pass

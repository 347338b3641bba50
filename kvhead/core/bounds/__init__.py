"""Page bounds: per (page, kv head) boxes of the keys, from which a query's page score is bound.

One concept in three forms: :class:`PageBounds` (fp32 min/max, the reference scoring form),
:class:`CompactBounds` (int8 boxes rounded outwards with one fp32 scale, and super-page boxes for
two-level selection) and :class:`LiveBounds` (the int8 form kept current while decode appends).
The vLLM plugin's device form is :class:`kvhead.vllm.device_bounds.DeviceBounds`.
"""

from kvhead.core.bounds.compact import CompactBounds
from kvhead.core.bounds.live import LiveBounds
from kvhead.core.pages import PageBounds

__all__ = ["CompactBounds", "LiveBounds", "PageBounds"]

"""Request identity for the plugin's selection state: stable-head top-K sets belong to requests.

vLLM's attention metadata says which blocks each batch row reads, not whose they are. A block of
a finished request goes to the next one, so a batch keyed by its rows' first blocks can hold
other requests than it did one step earlier; selection state keyed that way attends one
request with another's page choice. The model runner knows vLLM's request ids, so two small
wrappers hand them to the runtime (:mod:`kvhead.vllm.patches`): the attention-metadata build says
which request each row of this step is, the state update says which requests finished.

Each request gets a slot in :class:`RequestStates` for as long as it lives. A slot carries an
*epoch* that changes whenever its request starts afresh (a new request in the slot, a prefill
after preemption, a row whose length does not continue from its previous step); every layer
remembers the epoch it ranked for, so a layer can never attend with a selection made for
anything but this request at this length history.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeRows:
    """Who the decode rows of one step are, shared by every layer of that step."""

    slots: torch.Tensor  # [B] int64: each row's request slot
    epochs: torch.Tensor  # [B] int64: the slot's epoch (a layer that ranked another reranks)
    due: torch.Tensor  # [B] bool: the request's stable heads rerank now
    req_ids: tuple[str, ...]  # for log lines and errors

    @classmethod
    def lock_step(cls, batch: int, step: int, rerank_interval: int) -> DecodeRows:
        """Rows 0..B-1 as B requests that started together ``step`` steps ago (benchmarks and
        layer tests drive layers without an engine)."""
        return cls(
            slots=torch.arange(batch),
            epochs=torch.zeros(batch, dtype=torch.int64),
            due=torch.full((batch,), step % rerank_interval == 0),
            req_ids=tuple(f"row{r}" for r in range(batch)),
        )


@dataclass
class _Request:
    slot: int
    epoch: int
    steps: int = 0  # decode steps since the epoch began
    next_len: int = -1  # the sequence length its next decode step must have
    first_block: int = -1  # _RESUMED: the next row's, whatever it is
    blocks: torch.Tensor | None = None  # the blocks its row held at its last step


_RESUMED = -2


class RequestStates:
    """Live requests' slots, epochs and rerank clocks (one per worker process)."""

    def __init__(self, rerank_interval: int, page_size: int) -> None:
        self.rerank_interval, self.page_size = rerank_interval, page_size
        self._requests: dict[str, _Request] = {}
        self._free: list[int] = []
        self._epoch = 0  # epochs are unique across slots and time
        self.capacity = 0  # slots handed out so far (layers size their stores to it)
        self.step_req_ids: list[str] | None = None  # this step's rows, set by the runner
        self.changed = False  # a request ended or restarted since the last release

    def __len__(self) -> int:
        return len(self._requests)

    def _new_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    def _start(self, req_id: str) -> _Request:
        """A fresh state for ``req_id`` (a new slot, or its slot under a new epoch)."""
        old = self._requests.get(req_id)
        if old is not None:
            self.changed = True
            slot = old.slot
        elif self._free:
            slot = self._free.pop()
        else:
            slot, self.capacity = self.capacity, self.capacity + 1
        state = self._requests[req_id] = _Request(slot=slot, epoch=self._new_epoch())
        return state

    def end(self, req_ids: Iterable[str]) -> None:
        """Forget finished requests; their slots go back to the free list."""
        for req_id in req_ids:
            state = self._requests.pop(req_id, None)
            if state is not None:
                self._free.append(state.slot)
                self.changed = True

    def resume(self, req_id: str) -> None:
        """``req_id`` was preempted and its whole context was loaded back into new blocks (the
        KV connector's swap): its next row continues its state, on whatever blocks it has."""
        state = self._requests.get(req_id)
        if state is not None:
            state.first_block = _RESUMED

    def live_blocks(self) -> torch.Tensor:
        """Every block a live request's row held at its last step."""
        parts = [s.blocks for s in self._requests.values() if s.blocks is not None]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def plan(
        self,
        seq_lens: torch.Tensor,
        table: torch.Tensor,
        decode: torch.Tensor,
        prefill: torch.Tensor,
    ) -> DecodeRows:
        """Account one step: ``decode``/``prefill`` are batch row indices, ``seq_lens`` and
        ``table`` cover every row. Returns the decode rows' slots and which of them rerank.

        A request reranks at its first decode step and then every R of its own decode steps,
        never on a clock other requests move: its output is the same alone or beside others.

        A prefill row (a new request's chunk, or a preempted one recomputing) starts its
        request afresh; a decode row continues its request's state only if its length is the
        one the previous step left and its first block is the same, else it starts afresh too.
        Rows of a step whose request ids vLLM did not hand over (warm-up runs) are one-off
        requests, forgotten at once.
        """
        req_ids = self.step_req_ids
        count = seq_lens.shape[0]
        if req_ids is None or len(req_ids) < count:
            req_ids = [f"kvhead-anonymous-{self._epoch + 1}-{r}" for r in range(count)]
            anonymous = True
        else:
            anonymous = False
        pages = ((seq_lens + self.page_size - 1) // self.page_size).tolist()
        lens = seq_lens.tolist()
        for r in prefill.tolist():
            state = self._requests.get(req_ids[r])
            if state is not None and state.first_block == _RESUMED:  # resumed mid-prefill
                state.first_block = int(table[r, 0])
            elif state is None or state.next_len != -1:  # new, or recomputing after preemption
                state = self._start(req_ids[r])
            state.first_block = int(table[r, 0])
            state.blocks = table[r, : pages[r]].long().clone()
        slots, epochs, due, names = [], [], [], []
        for r in decode.tolist():
            req_id = req_ids[r]
            state = self._requests.get(req_id)
            first = int(table[r, 0])
            if state is not None and state.first_block == _RESUMED:
                state.first_block = first
            if state is None or state.first_block != first or state.next_len not in (-1, lens[r]):
                state = self._start(req_id)
                state.first_block = first
            slots.append(state.slot)
            epochs.append(state.epoch)
            due.append(state.steps % self.rerank_interval == 0)
            names.append(req_id)
            state.steps += 1
            state.next_len = lens[r] + 1
            state.blocks = table[r, : pages[r]].long().clone()
        rows = DecodeRows(
            slots=torch.tensor(slots, dtype=torch.int64),
            epochs=torch.tensor(epochs, dtype=torch.int64),
            due=torch.tensor(due, dtype=torch.bool),
            req_ids=tuple(names),
        )
        if anonymous:
            self.end(req_ids)
        return rows

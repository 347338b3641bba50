"""Selection state belongs to requests: slots, epochs and the rerank clock (no engine)."""

from __future__ import annotations

import torch

from kvhead.vllm.request_state import RequestStates

R, P = 4, 16


def _step(
    states: RequestStates,
    req_ids: list[str],
    lens: list[int],
    firsts: list[int],
    prefill: tuple[int, ...] = (),
):
    """One step whose rows are ``req_ids``; rows in ``prefill`` are prefill chunks."""
    states.step_req_ids = req_ids
    table = torch.tensor([[f + i for i in range(8)] for f in firsts], dtype=torch.int32)
    decode = torch.tensor([r for r in range(len(req_ids)) if r not in prefill])
    rows = states.plan(torch.tensor(lens), table, decode, torch.tensor(prefill, dtype=torch.long))
    states.step_req_ids = None
    return rows


def test_a_new_request_on_a_finished_requests_block_starts_afresh() -> None:
    """The engine-killing case: a short request ends, the next one gets its first block in a
    batch of the same size; it must not inherit the old selection."""
    states = RequestStates(R, P)
    _step(states, ["short"], [4], [7], prefill=(0,))
    first = _step(states, ["short"], [5], [7])
    again = _step(states, ["short"], [6], [7])
    assert bool(first.due[0]) and not bool(again.due[0])
    states.end(["short"])
    long = _step(states, ["long"], [440], [7], prefill=(0,))
    assert long.slots.numel() == 0  # prefill rows have no decode state yet
    rows = _step(states, ["long"], [441], [7])
    assert bool(rows.due[0]) and int(rows.epochs[0]) != int(first.epochs[0])
    assert int(rows.slots[0]) == int(first.slots[0])  # the freed slot is reused, new epoch


def test_each_request_reranks_on_its_own_clock_and_restarts_are_detected() -> None:
    """A request reranks at its first decode step and every R of its own steps, whatever runs
    beside it (its output must not depend on other traffic)."""
    states = RequestStates(R, P)
    _step(states, ["a"], [20], [0], prefill=(0,))
    due = [bool(_step(states, ["a"], [21 + i], [0]).due[0]) for i in range(6)]
    assert due == [True, False, False, False, True, False]  # its steps 0 and 4
    b = _step(states, ["a", "b"], [27, 33], [0, 50], prefill=(1,))
    late = _step(states, ["a", "b"], [28, 34], [0, 50])
    assert late.req_ids == ("a", "b") and late.due.tolist() == [False, True]  # b's first step
    epoch = int(late.epochs[0])
    # a row whose length does not continue its request (recomputed after preemption) restarts
    jumped = _step(states, ["a", "b"], [12, 35], [9, 50])
    assert bool(jumped.due[0]) and int(jumped.epochs[0]) != epoch
    assert not bool(jumped.due[1])  # b's second step: its own clock, not a's
    assert b.slots.numel() == 1


def test_finished_and_anonymous_requests_release_their_slots() -> None:
    states = RequestStates(R, P)
    _step(states, ["a", "b"], [10, 10], [0, 20])
    assert len(states) == 2 and states.capacity == 2
    states.end(["a", "b", "never-seen"])
    assert len(states) == 0 and states.changed
    assert states.live_blocks().numel() == 0
    rows = states.plan(
        torch.tensor([3, 3]),
        torch.zeros(2, 8, dtype=torch.int32),
        torch.tensor([0, 1]),
        torch.zeros(0, dtype=torch.long),
    )
    assert rows.due.all() and len(states) == 0  # warm-up rows: one-off requests


def test_a_client_that_leaves_is_served_by_its_first_sample_alone() -> None:
    """With n = 2 vLLM runs the samples as separate requests; the one a client counts is the
    first, the other may lag when the client hangs up."""
    from kvhead.vllm.request_mix import MixRequest, MixResult, served

    req = MixRequest("r", 0, [1, 2, 3], "completion", max_tokens=16, n=2, abort_after=4)
    lagging = MixResult("r", samples=[[5] * 4, [6] * 3], finish=[None, None], aborted=True)
    early = MixResult("r", samples=[[5] * 3, [6] * 4], finish=[None, None], aborted=True)
    assert served(req, lagging)
    assert not served(req, early)

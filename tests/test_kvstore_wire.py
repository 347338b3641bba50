"""Compiled RESP loops (kvstore/wire.py) against independent references: redis-py key names, the
numpy codec, hiredis' parser; and the fast path end to end on odd geometries."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import hiredis
import numpy as np
import pytest
import torch

from kvhead.core.spec import HeadPageSpec
from kvstore import PageKeys, RedisTier, RedisTierConfig, prefix_hashes
from kvstore.codec import PageCodec, page_bytes
from kvstore.wire import (
    SCAN_DONE,
    SCAN_EXTRA,
    SCAN_INCOMPLETE,
    SCAN_OTHER,
    scan,
    verify_pages,
    write_mget,
    write_sets,
)

SPEC = HeadPageSpec(num_q_heads=16, num_kv_heads=16, head_dim=16, page_size=4)
FP = "feedfacecafe0001"


def batch(
    n: int, spec: HeadPageSpec = SPEC, seed: int = 0
) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, spec.page_size, spec.head_dim, generator=g).to(spec.dtype)
    v = torch.randn(n, spec.page_size, spec.head_dim, generator=g).to(spec.dtype)
    pages = torch.tensor([12345, -3, 0, 9, 10, 99, 100, 7, 1000, 55] * n)[:n]
    heads = torch.randint(0, spec.num_kv_heads, (n,), generator=g)
    return PageKeys(5, torch.arange(n), heads, prefix_hashes(torch.arange(4 * n), 4), pages), k, v


def parts(keys: PageKeys) -> tuple[np.ndarray, ...]:
    assert keys.prefix is not None and keys.pages is not None
    return (
        np.frombuffer(f"{FP}:".encode(), np.uint8),
        np.frombuffer(b":5:", np.uint8),
        keys.prefix.numpy().view(np.uint8).reshape(-1, 16),
        keys.heads.numpy(),
        keys.pages.numpy(),
    )


def parse(buf: np.ndarray, size: int) -> list:
    reader = hiredis.Reader()
    reader.feed(bytes(buf[:size]))
    out = []
    while (cmd := reader.gets()) is not False:
        out.append(cmd)
    return out


def test_set_commands_match_key_names_and_the_numpy_codec():
    keys, k, v = batch(23)
    codec, tier = PageCodec(SPEC, FP), RedisTier.__new__(RedisTier)
    tier.fingerprint = FP
    buf = np.zeros(1 << 16, np.uint8)
    kb, vb = page_bytes(k), page_bytes(v)
    size = write_sets(
        buf,
        3,
        20,
        *parts(keys),
        codec.template(5),
        kb,
        vb,
        kb.view("<u8"),
        vb.view("<u8"),
        codec.weights,
        np.frombuffer(b"*5\r\n$3\r\nSET\r\n$", np.uint8),
        np.frombuffer(b"\r\n$%d\r\n" % codec.value_bytes, np.uint8),
        np.frombuffer(b"\r\n$2\r\nPX\r\n$4\r\n1000\r\n", np.uint8),
    )
    names = tier.key_names(keys)
    values = [bytes(x) for x in codec.encode(keys, k, v)]
    want = [[b"SET", names[i].encode(), values[i], b"PX", b"1000"] for i in range(3, 20)]
    assert parse(buf, size) == want

    size = write_mget(buf, 0, 23, *parts(keys))
    assert parse(buf, size) == [[b"MGET", *[x.encode() for x in names]]]


def test_scan_waits_for_complete_replies_and_hands_others_to_hiredis():
    values = [b"x" * 7, None, b"", b"\r\n\r\n"]
    body = b"".join(b"$-1\r\n" if x is None else b"$%d\r\n%s\r\n" % (len(x), x) for x in values)
    reply = np.frombuffer(b"*4\r\n" + body, np.uint8)
    starts, lens = np.zeros(8, np.int64), np.zeros(8, np.int64)
    for cut in range(len(reply)):  # every proper prefix is incomplete, never misread
        assert scan(reply[:cut], cut, 1, starts, lens)[0] == SCAN_INCOMPLETE
    assert scan(reply, len(reply), 1, starts, lens) == (SCAN_DONE, 4, 0)
    got = [None if n < 0 else bytes(reply[s : s + n]) for s, n in zip(starts[:4], lens[:4])]
    assert got == values

    oks = np.frombuffer(b"+OK\r\n" * 3, np.uint8)
    assert scan(oks, 15, 3, starts, lens) == (SCAN_DONE, 0, 0)
    assert scan(oks, 14, 3, starts, lens)[0] == SCAN_INCOMPLETE
    assert scan(oks, 15, 2, starts, lens)[0] == SCAN_EXTRA
    oom = np.frombuffer(b"+OK\r\n-OOM command not allowed\r\n", np.uint8)
    assert scan(oom, len(oom), 2, starts, lens)[0] == SCAN_OTHER
    bad = np.frombuffer(b"$3\r\nabcXY", np.uint8)  # no CRLF after the body
    assert scan(bad, len(bad), 1, starts, lens)[0] == SCAN_OTHER


def test_scan_need_never_exceeds_the_bytes_still_to_come():
    """The reader sleeps (SO_RCVLOWAT) until ``need`` more bytes are there: an overestimate for
    any cut of a reply Redis can send to the loops' ``SET`` or ``MGET`` (of at least one key)
    would stall a read until the timeout."""
    values = [b"v" * 300, None, b"", b"w" * 12, None]
    body = b"".join(b"$-1\r\n" if x is None else b"$%d\r\n%s\r\n" % (len(x), x) for x in values)
    replies = [
        (b"*5\r\n" + body, 1),
        (b"*2\r\n$-1\r\n$-1\r\n", 1),
        (b"*3\r\n_\r\n$2\r\nab\r\n_\r\n", 1),  # RESP3 nils
        (b"$5\r\nhello\r\n", 1),
        (b"+OK\r\n" * 4, 4),
        (b"+OK\r\n-OOM command not allowed when used memory > 'maxmemory'.\r\n+OK\r\n", 3),
        (b"-ERR wrong number of arguments\r\n", 1),
    ]
    starts, lens = np.zeros(8, np.int64), np.zeros(8, np.int64)
    for reply, count in replies:
        buf = np.frombuffer(reply, np.uint8)
        incomplete = 0
        for cut in range(len(reply)):
            status, _, need = scan(buf[:cut], cut, count, starts, lens)
            if status == SCAN_INCOMPLETE:
                incomplete += 1
                assert 1 <= need <= len(reply) - cut, (reply, cut, need)
            else:
                assert status == SCAN_OTHER  # only error replies stop early
        assert incomplete > 0
    resp3 = np.frombuffer(b"*3\r\n_\r\n$2\r\nab\r\n_\r\n", np.uint8)
    assert scan(resp3, len(resp3), 1, starts, lens) == (SCAN_DONE, 3, 0)
    assert lens[:3].tolist() == [-1, 2, -1]
    buf = np.frombuffer(b"*5\r\n" + body, np.uint8)  # mid-value: the rest of it, 3 per element
    assert scan(buf, 10, 1, starts, lens)[2] == len(b"*5\r\n$300\r\n") + 300 + 2 - 10 + 3 * 4


def test_verify_refuses_every_kind_of_wrong_page():
    keys, k, v = batch(6)
    codec = PageCodec(SPEC, FP)
    values = [bytearray(x) for x in codec.encode(keys, k, v)]
    values[1][-1] ^= 1  # payload bit flip
    values[2][40] ^= 1  # header: another head
    values[3] = values[3][:-8]  # truncated
    wire = [bytes(x) for x in values]
    wire[4] = None  # a miss
    reply = b"*6\r\n" + b"".join(
        b"$-1\r\n" if x is None else b"$%d\r\n%s\r\n" % (len(x), x) for x in wire
    )
    buf = np.frombuffer(reply, np.uint8)
    starts, lens = np.zeros(6, np.int64), np.zeros(6, np.int64)
    assert scan(buf, len(buf), 1, starts, lens) == (SCAN_DONE, 6, 0)
    out = np.zeros((6, codec.payload_bytes), np.uint8)
    ok, corrupt = np.zeros(6, bool), np.zeros(6, bool)
    want = np.ascontiguousarray(codec.expected(keys)).view("<u8")
    verify_pages(
        buf, starts, lens, 6, 0, False, want, codec.weights, out, out.view("<u8"), ok, corrupt
    )
    assert ok.tolist() == [True, False, False, False, False, True]
    assert corrupt.tolist() == [False, True, True, True, False, False]
    pages = codec.finish(out, ok, corrupt).pages
    assert torch.equal(pages[0, 0], k[0]) and torch.equal(pages[5, 1], v[5])
    assert not pages[1:5].any()


@pytest.mark.parametrize("head_dim, page_size", [(2, 1), (6, 1)])
def test_payloads_whose_halves_are_not_whole_words_round_trip(redis_srv, head_dim, page_size):
    """K alone is 4 or 12 bytes here: the checksum runs over K|V as one payload."""
    spec = HeadPageSpec(num_q_heads=2, num_kv_heads=2, head_dim=head_dim, page_size=page_size)
    assert spec.head_page_bytes % 8 == 0  # K|V together is whole words (the codec needs it)
    tier = RedisTier(spec, RedisTierConfig(url=redis_srv.url, pipeline_depth=3), FP)
    keys, k, v = batch(10, spec)
    assert tier.put(keys, k, v).all()
    got = tier.get(keys)
    assert got.found.all() and torch.equal(got.k, k) and torch.equal(got.v, v)
    ref = PageCodec(spec, FP).decode(keys, [tier.client.get(x) for x in tier.key_names(keys)])
    assert ref.ok.all() and not ref.corrupt.any()  # the numpy reference accepts them too


def test_importing_kvstore_does_not_load_numba():
    """Only building a Redis tier loads numba: vLLM's kernel registration scans loaded modules
    and broke on numba/llvmlite objects when the plugin imported kvstore for its host arena."""
    code = "import sys, kvstore, kvstore.metrics; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def fake_redis(
    sock: socket.socket, values: dict[bytes, bytes | None], resp3: bool, piece: int
) -> None:
    """Answer each MGET on ``sock`` with ``values``, ``piece`` bytes at a time."""
    parser = hiredis.Reader()
    while data := sock.recv(1 << 16):
        parser.feed(data)
        while (cmd := parser.gets()) is not False:
            reply = b"*%d\r\n" % (len(cmd) - 1)
            for key in cmd[1:]:
                x = values.get(key)
                reply += (
                    (b"_\r\n" if resp3 else b"$-1\r\n")
                    if x is None
                    else (b"$%d\r\n%s\r\n" % (len(x), x))
                )
            for i in range(0, len(reply), piece):
                sock.sendall(reply[i : i + piece])
                time.sleep(0)  # let the reader see partial replies


def read_from_fake(
    tier: RedisTier, keys: PageKeys, stored: list, resp3: bool, piece: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """``tier``'s compiled get of ``keys`` (3 per chunk) against :func:`fake_redis` holding
    ``stored``: ``out, ok, corrupt`` and the chunks handed to hiredis (decoded as
    ``RedisTier.get`` does)."""
    codec, want = tier.codec, tier.codec.expected(keys)
    out = np.zeros((len(keys), codec.payload_bytes), np.uint8)
    ok, corrupt = np.zeros(len(keys), bool), np.zeros(len(keys), bool)
    slow: list[int] = []

    def on_slow(i: int, replies: list) -> None:
        slow.append(i)
        rows = slice(3 * i, 3 * i + 3)
        ok[rows], corrupt[rows] = codec.decode_into(replies[0], want[rows], out, rows)

    ours, theirs = socket.socketpair()
    names = [x.encode() for x in tier.key_names(keys)]
    server = threading.Thread(
        target=fake_redis, args=(theirs, dict(zip(names, stored)), resp3, piece)
    )
    server.start()
    with ours:
        tier._pipe.get(keys, want, out, ok, corrupt, on_slow)(ours)
    server.join()
    theirs.close()
    return out, ok, corrupt, slow


@pytest.mark.parametrize("resp3, piece", [(False, 1), (True, 7), (False, 100), (True, 4096)])
def test_scattered_reads_survive_any_split_and_any_surprise(resp3, piece):
    """Replies are received as if every key held a page (payloads straight into the result);
    a miss, a value of another size or a wrong header at any position, with the reply arriving
    in pieces of any size, must give exactly what the numpy codec says about the same values.
    A reply too big for the receive buffer goes to hiredis for its chunk only."""
    keys, k, v = batch(7)
    tier = RedisTier(SPEC, RedisTierConfig(url="redis://127.0.0.1:1/0", pipeline_depth=3), FP)
    codec = tier.codec
    good = [bytes(x) for x in codec.encode(keys, k, v)]
    cases = [
        {},
        {0: None},
        {2: None},
        {6: None},
        {1: b"short"},
        {5: good[5] + b"x"},
        {3: good[4]},
        {0: None, 1: None, 2: None},
        {4: good[4] * 200},
    ]  # > 64 KiB
    for case in cases:
        stored = [case.get(i, good[i]) for i in range(7)]
        out, ok, corrupt, slow = read_from_fake(tier, keys, stored, resp3, piece)
        ref = codec.decode(keys, stored)
        assert slow == ([1] if 4 in case else []), case
        assert ok.tolist() == ref.ok.tolist(), case
        assert corrupt.tolist() == ref.corrupt.tolist(), case
        assert torch.equal(codec.finish(out, ok, corrupt).pages, ref.pages), case

"""The chunked framing of the relayed body (zaiproxy._native._framing and its twin) against h11.

The upstream side decodes a chunked body with ``Dechunker`` and hands h11 only the head and,
at the end, the raw last chunk (``Dechunker.tail``); the client side frames each relayed
chunk with ``frame_chunk``. Both must be indistinguishable from h11 doing it all: the same
body bytes, the same accepted and refused framings, whatever the read splits, on the HTTP
implementation under test (ZAIPROXY_HTTP_IMPL) and with both implementations of the module.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zaiproxy._native import _framing, _framing_py

from zaiproxy.http.http11 import h11

IMPLS = [pytest.param(_framing, id="native"), pytest.param(_framing_py, id="python")]
HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _client_at_body() -> h11.Connection:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"),
                                                                ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD)
    assert type(conn.next_event()) is h11.Response
    return conn


def _h11_alone(reads: list[bytes]) -> tuple[bytes, bool, list[tuple[bytes, bytes]]]:
    """h11 doing it all: body, whether it ended cleanly, the trailers."""
    conn = _client_at_body()
    body = b""
    for data in [*reads, b""]:
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return body, False, []
            if type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                return body, True, list(event.headers)
            else:
                break
    return body, False, []


def _dechunked(impl: object, reads: list[bytes]) -> tuple[bytes, bool, list[tuple[bytes, bytes]]]:
    """The proxy's way: the Dechunker, then h11 for the last chunk and the trailers."""
    conn = _client_at_body()
    dec = impl.Dechunker(max_line=65536)  # type: ignore[attr-defined]
    body = b""
    to_h11: list[bytes] = []
    for i, data in enumerate(reads):
        if dec.ended:
            to_h11.append(data)
            continue
        try:
            got = dec.feed(data)
        except impl.FramingError:  # type: ignore[attr-defined]
            return body, False, []
        body += got
        if dec.ended:
            to_h11.append(dec.tail)
        del i
    if not dec.ended:
        return body, False, []  # EOF before the last chunk
    for data in [*to_h11, b""]:
        conn.receive_data(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return body, False, []
        if type(event) is h11.EndOfMessage:
            assert conn.their_state is h11.DONE
            return body, True, list(event.headers)
        assert event is h11.NEED_DATA
    return body, False, []


def _splits(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(raw)]:
        out.append(raw[prev:p])
        prev = p
    return [r for r in out if r]


ext = st.sampled_from([b"", b";a=b", b";x", b"; q=\"1\"", b";a\rb", b"  ", b"\t", b";"])
chunk = st.tuples(st.binary(min_size=1, max_size=40), ext,
                  st.sampled_from([0, 1, 2]))  # hex size: lower, upper, leading zeros
trailers = st.sampled_from([b"", b"X-A: 1\r\n", b"X-A: 1\r\nX-B:  two \r\n", b"Bad Header\r\n",
                            b"X-A: 1\n"])
garbage = st.sampled_from([None, b"\r\n", b"G", b"\n", b"\r", b" ;", b"-1", b"\r\r\n",
                           b"123456789012345678901", b";a\nb\r\n", b"5 x\r\n"])


def _encode(chunks: list[tuple[bytes, bytes, int]], trailer: bytes, bad: bytes | None,
            bad_at: int, after: bytes) -> bytes:
    parts = []
    for data, extension, style in chunks:
        size = b"%x" % len(data)
        size = size.upper() if style == 1 else (b"00" + size if style == 2 else size)
        parts.append(size + extension + b"\r\n" + data + b"\r\n")
    parts.append(b"0\r\n" + trailer + b"\r\n" + after)
    raw = b"".join(parts)
    if bad is not None:
        at = bad_at % (len(raw) + 1)
        raw = raw[:at] + bad + raw[at:]
    return raw


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(chunk, max_size=6), trailer=trailers, bad=garbage,
       bad_at=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_same_body_and_verdict_as_h11(impl: object, chunks: list[tuple[bytes, bytes, int]],
                                      trailer: bytes, bad: bytes | None, bad_at: int,
                                      cuts: list[int]) -> None:
    raw = _encode(chunks, trailer, bad, bad_at, b"")
    reads = _splits(raw, cuts)
    expected = _h11_alone(reads)
    got = _dechunked(impl, reads)
    assert got[1] == expected[1], (raw, reads)
    if expected[1]:
        assert got == expected
    else:
        # Refused: the bytes relayed before the refusal are the body h11 gave up to there or
        # less (a bad line is refused by its first bad byte, h11 waits for its CRLF).
        assert expected[0].startswith(got[0])
    if bad is None and b"Bad" not in trailer:
        assert expected[1] and got[0] == b"".join(d for d, _, _ in chunks)


@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_native_and_twin_agree_read_by_read(impl: object, data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes: every read's output and every refusal the same in both."""
    del impl
    outs = []
    for mod in (_framing, _framing_py):
        dec = mod.Dechunker(max_line=32)
        seen: list[object] = []
        for piece in _splits(data, cuts):
            try:
                seen.append(dec.feed(piece))
            except mod.FramingError as exc:
                seen.append(("error", str(exc)))
                break
            if dec.ended:
                seen.append(("tail", dec.tail))
                break
        outs.append(seen)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_bytes_after_the_message_reach_h11(impl: object) -> None:
    """The last chunk, trailers and what follows go to h11 whole: nothing is lost."""
    dec = impl.Dechunker()  # type: ignore[attr-defined]
    assert dec.feed(b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\nHTTP/1.1 200") == b"hello"
    assert dec.ended and dec.tail == b"0\r\nX-T: 1\r\n\r\nHTTP/1.1 200"
    conn = _client_at_body()
    conn.receive_data(dec.tail)
    event = conn.next_event()
    assert type(event) is h11.EndOfMessage and list(event.headers) == [(b"x-t", b"1")]
    assert conn.their_state is h11.DONE
    assert conn.trailing_data[0] == b"HTTP/1.1 200"


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_read_of_chunk_data_is_returned_uncopied(impl: object) -> None:
    dec = impl.Dechunker()  # type: ignore[attr-defined]
    assert dec.feed(b"10\r\n") == b""
    data = b"0123456789abcdef"
    assert dec.feed(data) is data
    assert dec.feed(b"\r\n3\r\nabc\r\n4\r\nd") == b"abcd"
    assert not dec.ended


@pytest.mark.parametrize("impl", IMPLS)
def test_long_size_line_refused_only_while_incomplete(impl: object) -> None:
    """h11's limit: an unfinished line over max_incomplete_event_size is refused; a long line
    that arrives whole is not."""
    long_ext = b"5;" + b"e" * 100
    dec = impl.Dechunker(max_line=64)  # type: ignore[attr-defined]
    assert dec.feed(long_ext + b"\r\nhello\r\n") == b"hello"
    dec = impl.Dechunker(max_line=64)  # type: ignore[attr-defined]
    with pytest.raises(impl.FramingError):  # type: ignore[attr-defined]
        dec.feed(long_ext)


@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.binary(max_size=200))
def test_frame_chunk_is_h11s_chunked_writer(impl: object, data: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert type(conn.next_event()) is h11.Request
    conn.send(h11.Response(status_code=200, headers=[]))
    assert impl.frame_chunk(data) == (conn.send(h11.Data(data=data)) or b"")  # type: ignore[attr-defined]


async def test_client_side_chunks_are_well_formed_and_keep_alive_holds(nursery):
    """Through the proxy: a streamed answer framed natively, then a Content-Length one
    (framed by h11, which counts its bytes), then a stream again, on one client connection:
    h11's state reached DONE after each, so the connection served them all."""
    import h11 as h11_client  # the harness's client is plain h11: a differential across the wire
    import orjson

    from tests.harness import RawClient, make_config, start_mock, start_proxy

    headers = [("content-type", "application/json")]
    stream_body = orjson.dumps({"model": "glm-4.6", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]})
    plain_body = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
    upstream = await start_mock(nursery)
    proxy = await start_proxy(nursery, make_config(upstream))
    client = await RawClient.connect("127.0.0.1", proxy.port)
    try:
        for body in (stream_body, plain_body, stream_body):
            resp = await client.request("POST", "/v1/chat/completions", headers, body)
            assert resp.status == 200 and resp.complete
            names = {name for name, _ in resp.headers}
            if body is stream_body:
                assert b"transfer-encoding" in names and b"content-length" not in names
                assert resp.body.rstrip().endswith(b"data: [DONE]")
            else:
                assert b"content-length" in names
                assert orjson.loads(resp.body)["choices"]
            assert client.conn.our_state is h11_client.IDLE  # start_next_cycle ran: reusable
    finally:
        await client.aclose()
    assert proxy.pool.opened == 1


"""framing.py, pure: a table of raw heads -> the guard's verdict, and h11's messages made safe."""

from __future__ import annotations

import h11
import pytest

from zaiproxy.http import framing

OK = None
CASES: list[tuple[bytes, str | None]] = [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", OK),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", OK),
    (b"POST / HTTP/1.1\r\nHost: a\r\ncOnTeNt-LeNgTh: 2\r\n\r\n{}", OK),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", OK),
    # a body full of bare LFs and folded-looking lines is not the head
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\na\n b\n\tc\n", OK),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9\r\n\r\n", OK),  # obs-text: forwarded
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
     framing.BOTH_LENGTHS),
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", framing.BARE_LF),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\n\r\n", framing.BARE_LF),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n continued\r\n\r\n", framing.OBS_FOLD),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tcontinued\r\n\r\n", framing.OBS_FOLD),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
     framing.CL_REPEATED),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2,2\r\n\r\n{}", framing.CL_REPEATED),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", framing.TE_HTTP10),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", framing.CONTROL),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", framing.CONTROL),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\tb\r\n\r\n", OK),
]


@pytest.mark.parametrize("raw, verdict", CASES)
def test_guard_table(raw: bytes, verdict: str | None) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert type(event) is h11.Request  # h11 itself accepts every one of these
    problem, chunked = framing.check_head(raw, event.http_version)
    assert problem == verdict
    assert chunked is any(name == b"transfer-encoding" for name, _ in event.headers)


def test_a_head_the_guard_cannot_find_fails_closed() -> None:
    assert framing.check_head(b"GET / HTTP/1.1\r\nHost: a\r\n", b"1.1")[0] == framing.UNVERIFIED


def test_head_end_uses_h11s_rule() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert framing.head_end(head + b"rest") == len(head)
    assert framing.head_end(b"GET / HTTP/1.1\nHost: a\n\nrest") == len(b"GET / HTTP/1.1\nHost: a\n\n")
    assert framing.head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") == -1


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-secret-123\x00\r\n\r\n",
    b"GET /sk-secret-123\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsk-secret-123XX",
])
def test_protocol_messages_never_quote_the_bytes(data: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    with pytest.raises(h11.RemoteProtocolError) as info:
        while conn.next_event() is not h11.NEED_DATA:
            pass
    message = framing.safe_protocol_message(info.value)
    assert "secret" not in message and message
    assert len(message) <= 120

"""Request framing the proxy refuses although h11 accepts it: the request-smuggling guard.

A proxy behind another HTTP hop (an ingress, a load balancer, a service mesh) is safe only
if both hops agree where each request ends. When they disagree, the bytes one hop takes
for the tail of a body the other parses as a new request (a *desync*; CL.TE and TE.CL in
the literature), and that request runs with the proxy's upstream key. h11 is lenient in
the places where front ends differ, so the proxy decides here, before anything is routed
or read:

=====================================  ======================================================
ambiguity                              decision
=====================================  ======================================================
Content-Length and Transfer-Encoding   400 + close. RFC 9112 6.1 allows TE framing only if
                                       the connection is closed after the response; a front
                                       end that framed by Content-Length has already sent us
                                       what it thinks is the next request. Envoy, nginx (on
                                       HTTP/1.0) and HAProxy's strict mode refuse it; h11
                                       frames it as chunked and keeps the connection.
a bare LF ending a line of the head    400 + close. RFC 9112 2.2 lets a recipient accept a
                                       bare LF, and h11 does: ``X-A: b\\nTransfer-Encoding:
                                       chunked`` is two headers to h11 and one to a front
                                       end that ends lines only at CRLF.
obs-fold (a line starting with SP/HT)  400 + close. RFC 9112 5.2: reject or unfold; h11
                                       unfolds, a front end may not, and no client we serve
                                       folds headers (obsolete since RFC 7230).
two Content-Length fields, or a list   400 + close, even when the values are equal. RFC
(``Content-Length: 3, 3``)             9110 8.6 allows either merging or rejecting; h11
                                       merges, nginx and Envoy reject. Nothing legitimate
                                       sends it.
Transfer-Encoding in HTTP/1.0          400 + close. RFC 9112 6.1: the framing is faulty.
chunked request body (HTTP/1.1, no     Served, then the connection is closed. The trailer
Content-Length)                        section ends at a blank line h11 finds with the same
                                       bare-LF leniency, and this module never sees those
                                       bytes: closing the connection means nothing after a
                                       chunked body is ever read as a request.
control bytes in the head (other than  400 + close. h11 refuses NUL, CR and LF in a value but
HTAB and the CRLFs)                    passes the other controls (``\x01``, ``\x7f``...);
                                       RFC 9110 5.5's grammar has no place for them, no
                                       client sends them, and a hop or log viewer further on
                                       may act on them.
non-ASCII bytes in a field value       Accepted and forwarded as opaque bytes (RFC 9110 5.5,
(obs-text)                             ``obs-text``): some clients put UTF-8 in custom
                                       headers, and such bytes cannot move a message
                                       boundary. Field *names* must be tokens (h11 refuses
                                       the rest). The proxy never logs header values.
=====================================  ======================================================

The checks need the raw bytes of the head (h11's events no longer show bare LFs, folds or
a second equal Content-Length), so the connection keeps the bytes it fed h11 since the
previous request ended and passes them here with the parsed request. Pure functions, no
I/O; ``tests/test_framing.py`` drives them with a table of heads, and the proxy-level
tests send each shape over a socket.
"""

from __future__ import annotations

import re
from typing import Final

# Where h11 ends a head: the first blank line, with the same LF-or-CRLF leniency
# (h11/_receivebuffer.py ``blank_line_regex``). Using the same rule is what makes the
# raw bytes checked here exactly the bytes h11 parsed.
_HEAD_END: Final = re.compile(rb"\n\r?\n")
# Header names are matched in the raw head too (h11 has validated them as tokens, so the raw
# form is exact): iterating h11's Headers builds a tuple per field in Python, ~4 us a head.
_CONTENT_LENGTH: Final = re.compile(rb"\ncontent-length:([^\r\n]*)", re.IGNORECASE)
_TRANSFER_ENCODING: Final = re.compile(rb"\ntransfer-encoding:", re.IGNORECASE)
# A line that starts with whitespace: obs-fold. (One regex per check: an alternation with a
# character class scanned the head ~10x slower than this and a ``translate``.)
_FOLD: Final = re.compile(rb"\n[ \t]")
# Control bytes other than HTAB, CR and LF: ``translate`` deletes them; a shorter head had some.
_CONTROLS: Final = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])

# Reasons, also the client-facing message (they say what was refused, never echo bytes).
BOTH_LENGTHS: Final = "request has both Content-Length and Transfer-Encoding (ambiguous framing)"
BARE_LF: Final = "request head has a line ending in a bare LF (CRLF required)"
OBS_FOLD: Final = "request head has an obsolete line folding (obs-fold)"
CONTROL: Final = "request head contains a control character"
CL_REPEATED: Final = "request has more than one Content-Length value"
TE_HTTP10: Final = "Transfer-Encoding is not allowed in an HTTP/1.0 request"
UNVERIFIED: Final = "request head could not be verified"


def head_end(raw: bytes, start: int = 0) -> int:
    """Index just after the head in ``raw`` (h11's rule), or -1 if it is not complete."""
    match = _HEAD_END.search(raw, start)
    return -1 if match is None else match.end()


def check_head(raw: bytes, http_version: bytes) -> tuple[str | None, bool]:
    """(why this request's framing is refused or None, whether its body is chunked).

    ``raw`` starts with the head h11 parsed into a request of ``http_version`` (more bytes
    may follow: body, pipelined requests).
    """
    end = head_end(raw)
    if end < 0:
        return UNVERIFIED, False  # h11 parsed a head we cannot find: fail closed
    head = raw if end == len(raw) else raw[:end]  # ~1 KB copied; each check below is C
    # Every LF of the head must be the end of a CRLF (the request line's included).
    if head.count(b"\n") != head.count(b"\r\n"):
        return BARE_LF, False
    if _FOLD.search(head) is not None:
        return OBS_FOLD, False
    if len(head.translate(None, _CONTROLS)) != len(head):
        return CONTROL, False
    chunked = _TRANSFER_ENCODING.search(head) is not None
    lengths = _CONTENT_LENGTH.findall(head)
    if chunked and http_version == b"1.0":
        return TE_HTTP10, True
    if chunked and lengths:
        return BOTH_LENGTHS, True
    # h11 keeps one Content-Length when all values agree; the raw head tells.
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        return CL_REPEATED, False
    return None, chunked


# h11 quotes the offending bytes in some messages ("illegal header line: bytearray(b'...')",
# "Illegal header value b'...'", "malformed chunk footer: b'...'"): a header line may be a
# credential and a chunk footer is body text, and the message goes into the error body, the
# access log and the history. Everything from the quoted bytes on is cut.
_QUOTED: Final = re.compile(r":?\s*(?:bytearray\()?b['\"].*\Z", re.DOTALL)
_MAX_MESSAGE: Final = 120


def safe_protocol_message(exc: BaseException) -> str:
    """h11's error message without the bytes it quotes, bounded (for bodies and logs)."""
    message = _QUOTED.sub("", str(exc))
    return message[:_MAX_MESSAGE] or type(exc).__name__

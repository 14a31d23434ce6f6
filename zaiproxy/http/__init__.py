"""The HTTP/1.1 wire: h11 selection, the framing guard, the socket stream, SSE."""

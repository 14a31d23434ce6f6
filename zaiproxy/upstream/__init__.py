"""The upstream side: connection pool, request headers, Z.AI 429 handling."""

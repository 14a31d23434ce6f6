"""The built-in mock upstream (OpenAI- and Anthropic-compatible, with fault injection)."""

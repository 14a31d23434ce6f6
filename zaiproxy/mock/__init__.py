"""The built-in mock upstream (OpenAI- and Anthropic-compatible, with fault injection).

Used by ``zaiproxy serve --demo``, the test suite and the benchmarks. Modules:

- :mod:`~zaiproxy.mock.behaviour` - pure: options, request -> response plan, routing, auth;
- :mod:`~zaiproxy.mock.controls` - pure: ``x-mock-*`` headers and ``mock-*`` model names;
- :mod:`~zaiproxy.mock.payloads` - pure: the JSON / SSE bodies of each API;
- :mod:`~zaiproxy.mock.wire` - pure: a plan as timed writes on the wire, faults included;
- :mod:`~zaiproxy.mock.quota` - Z.AI's quota endpoint, ``/mock/quota``, and the accounts'
  token usage it reports (a shared-memory block, so the workers agree);
- :mod:`~zaiproxy.mock.server` - the trio + h11 shell (``serve_mock``, ``serve_mock_tcp``);
- :mod:`~zaiproxy.mock.run` - the process entry (``run``), 1..N spawned workers.

The pure modules, and quota, import neither trio nor h11.
"""

"""Model fallback on Z.AI's 1312 (model congestion): where a request may go next (pure).

Z.AI answers 1312 when one model is congested; the same request often succeeds at once on
another. ``upstream.model_fallback`` lists, per requested model, the models to try in
order (``core/config_values.py``'s :class:`~zaiproxy.core.config_values.ModelFallback`;
default: none, and a 1312 is retried on its model as before). The pipeline computes the
request's list once (:func:`fallback_models`) and hands the exchange a :class:`Fallback`;
the exchange (``request/exchange.py``) does the rest:

- a 1312 while the list has a model left sends the request to that model **at once**, with
  no congestion backoff (the wait is for the congested model, not the next one), after
  admitting it again like any retry;
- each fallback is one retry of ``max_retries`` (the budget bounds how many times one
  request goes upstream; ``config check`` refuses a list longer than the budget);
- once the list is used up, the usual 1312 handling applies to the last model tried (a
  backoff, then that model again, then the 429 relayed with ``X-Zai-Error-*``);
- every other 429 class is handled as without fallback (1302/1303 are this account's rate,
  which another model does not change).

Only generating routes fall back (chat/completions, completions, messages): another model's
embeddings are not interchangeable, and a token count is not worth a model change. A client
key restricted to some models never falls back to a model it may not use. Each list is the
whole route for its requested model: a fallback model's own list is never followed.

The body sent to a fallback model is the client's JSON with ``model`` replaced, serialised
again with orjson (:func:`body_for`): only on fallback, never on the normal path, whose
bytes go out as the client sent them. A body orjson cannot re-serialise exactly (an integer
past 64 bits) does not fall back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from zaiproxy.http.http11 import h11
from zaiproxy.request.routing import Route
from zaiproxy.request.usage_rewrite import add_include_usage, reserialisable

if TYPE_CHECKING:
    from zaiproxy.core.config_values import ModelFallback
    from zaiproxy.limits.keys import ClientKey

__all__ = ["Fallback", "body_for", "fallback_models"]


@dataclass(frozen=True, slots=True)
class Fallback:
    """One request's fallback: the models to try after ``requested``, in order, and how to
    build the upstream request for one of them (None: its body cannot be rewritten)."""

    requested: str  # the configured name of the requested model (the metrics' from_model)
    models: tuple[str, ...]
    build: Callable[[str], tuple[h11.Request, bytes] | None]


def fallback_models(fallback: ModelFallback, route: Route, model: str | None,
                    key: ClientKey | None) -> tuple[str | None, tuple[str, ...]]:
    """(the configured name ``model`` matched, the models it may fall back to), or
    (None, ()) when the request does not fall back. Names compare case-insensitively."""
    if not fallback.routes or model is None or not route.generates_output:
        return None, ()
    found = fallback.lookup(model)
    if found is None:
        return None, ()
    name, chain = found
    if key is not None:
        chain = tuple(m for m in chain if key.allows_model(m))
    return (name, chain) if chain else (None, ())


def body_for(payload: dict[str, object], body: bytes, model: str, *,
             include_usage: bool) -> bytes | None:
    """The upstream body for ``model``: ``payload`` (parsed from the client's ``body``) with
    its ``model`` replaced, keeping every other field and their order; with
    ``include_usage``, rewritten as the original was (``stream_options.include_usage``).
    None when re-serialising would change the body's numbers."""
    if not reserialisable(body, payload):
        return None
    out = orjson.dumps({**payload, "model": model})
    if include_usage:
        out = add_include_usage(out) or out
    return out

"""Bounded label values that more than one wing derives from a request (pure).

The request path (the ledger's token counters per model) and the metrics (``model`` on the
token, cost and time-to-first-token series) must put a request under the same label, or
``/admin/keys`` and ``/metrics`` disagree about a model's tokens: one function, here at the
bottom so both may import it.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

NO_MODEL: Final = "-"  # the request named no model
OTHER_MODEL: Final = "other"  # a model outside the configured known_models


def model_label(model: str | None, known_models: Container[str]) -> str:
    """A configured model name as it is, any other ``other``, none ``-``: client-chosen model
    names never become label values (each would be a new series or ledger row)."""
    if model is None:
        return NO_MODEL
    return model if model in known_models else OTHER_MODEL

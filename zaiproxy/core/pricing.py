"""What a request's tokens cost: a per-model price table with peak / off-peak tiers.

Prices are **USD per 1,000 tokens** for four directions: ``input`` (uncached prompt
tokens), ``output``, ``cache_read`` (prompt tokens served from the cache) and
``cache_write`` (tokens written to the cache). :data:`DEFAULT_PRICES` holds Z.AI's
published list prices for the GLM models as of late 2025 (international site,
``docs.z.ai`` "Pricing"; per 1M tokens: glm-4.6 / glm-4.5 $0.60 in, $0.11 cached, $2.20
out; glm-4.5-air $0.20 / $0.03 / $1.10; glm-4.5-x $2.20 / $0.45 / $8.90; glm-4.5-airx
$1.10 / $0.22 / $4.50; glm-4.5v $0.60 / $0.11 / $1.80; glm-4.6v $0.30 / $0.05 / $0.90;
glm-4-32b-0414-128k $0.10 / - / $0.10; glm-4.5-flash free; cache storage "limited-time
free"). **They are defaults to replace**: prices change, contracts differ, and the
estimate is only as good as the table. Set ``tokens.price_file`` (env
``ZAIPROXY_PRICE_FILE``) to a TOML or JSON file; it replaces the whole table::

    peak_hours = "14:00-18:00"   # Beijing time (UTC+8), [start, end); may wrap midnight

    [models."glm-4.6"]           # USD per 1K tokens; all four are required
    input = 0.0006
    output = 0.0022
    cache_read = 0.00011
    cache_write = 0.0

    [models."glm-4.6".peak]      # optional: a model with a peak and/or off_peak table is
    input = 0.0012               # tiered; each overrides any of the four, the rest come
    output = 0.0044              # from the model's own prices
    [models."glm-4.6".off_peak]
    input = 0.0003

    [models."*"]                 # optional: prices for every model not listed

Tiers (the ``pricing_tier`` metric label): a model without ``peak``/``off_peak`` tables is
``standard`` at all times; a tiered model is ``peak`` while Beijing time is inside
``peak_hours`` and ``off_peak`` outside it. Beijing has no daylight saving time, so the
window is a fixed UTC offset. The built-in table has no tiered model (Z.AI's API list
prices have none today; the GLM Coding Plan's 14:00-18:00 peak changes quota, not price).

OpenAI-style usage counts cached tokens inside ``prompt_tokens``; Anthropic-style
``input_tokens`` excludes them. :func:`PriceTable.cost` takes ``input_includes_cache`` so
cached tokens are never billed twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from zaiproxy.core.config_values import Invalid, string
from zaiproxy.core.record import Usage

TIER_STANDARD: Final = "standard"
TIER_PEAK: Final = "peak"
TIER_OFF_PEAK: Final = "off_peak"
DIRECTIONS: Final = ("input", "output", "cache_read", "cache_write")
BEIJING_UTC_OFFSET_S: Final = 8 * 3600
DEFAULT_PEAK_HOURS: Final = "14:00-18:00"
_MAX_PRICE = 1000.0  # USD per 1K tokens: anything above is a typo (per 1M pasted as per 1K is x1000)
_HOURS_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")


class PriceFileError(Exception):
    """The price file is unreadable or invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(list(problems))
        self.problems = list(problems)

    def __str__(self) -> str:
        return "; ".join(self.problems)


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per 1K tokens of each direction."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    # Nano-USD per token, precomputed for the integer counters of /metrics.
    nano: tuple[float, float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        per_token = tuple(p * 1e6 for p in (self.input, self.output, self.cache_read,
                                             self.cache_write))
        object.__setattr__(self, "nano", per_token)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    standard: Prices
    peak: Prices | None = None
    off_peak: Prices | None = None

    @property
    def tiered(self) -> bool:
        return self.peak is not None or self.off_peak is not None


def _tokens(usage: Usage, input_includes_cache: bool) -> tuple[int, int, int, int]:
    """(uncached input, output, cache read, cache write) token counts."""
    inp = usage.input_tokens
    if input_includes_cache:
        inp = max(0, inp - usage.cache_read_tokens)
    return inp, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens


@dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelPrice]
    peak_start_min: int = 14 * 60  # minutes after midnight, Beijing time
    peak_end_min: int = 18 * 60
    fallback: ModelPrice | None = None  # the "*" entry

    def lookup(self, model: str | None) -> ModelPrice | None:
        if model is None:
            return None
        return self.models.get(model, self.fallback)

    def in_peak(self, when: float) -> bool:
        """Whether unix time ``when`` is inside the Beijing-time peak window."""
        minute = int((when + BEIJING_UTC_OFFSET_S) // 60) % 1440
        start, end = self.peak_start_min, self.peak_end_min
        if start <= end:
            return start <= minute < end
        return minute >= start or minute < end  # the window wraps midnight

    def quote(self, model: str | None, when: float) -> tuple[str, Prices | None]:
        """(pricing tier, the prices in force) for ``model`` at unix time ``when``."""
        entry = self.lookup(model)
        if entry is None:
            return TIER_STANDARD, None
        if not entry.tiered:
            return TIER_STANDARD, entry.standard
        if self.in_peak(when):
            return TIER_PEAK, entry.peak or entry.standard
        return TIER_OFF_PEAK, entry.off_peak or entry.standard

    def tier(self, model: str | None, when: float) -> str:
        return self.quote(model, when)[0]

    def cost(self, model: str | None, usage: Usage, when: float, *,
             input_includes_cache: bool = False) -> float:
        """Estimated USD for ``usage`` of ``model`` at ``when`` (0.0 for an unpriced model)."""
        _, prices = self.quote(model, when)
        if prices is None:
            return 0.0
        t = _tokens(usage, input_includes_cache)
        return (t[0] * prices.input + t[1] * prices.output + t[2] * prices.cache_read
                + t[3] * prices.cache_write) / 1000


def cost_nano(prices: Prices, tokens: tuple[int, int, int, int]) -> int:
    """The cost of ``tokens`` (as from :func:`split_tokens`) in whole nano-USD."""
    n = prices.nano
    return round(tokens[0] * n[0] + tokens[1] * n[1] + tokens[2] * n[2] + tokens[3] * n[3])


def split_tokens(usage: Usage, input_includes_cache: bool) -> tuple[int, int, int, int]:
    """(uncached input, output, cache_read, cache_write): the four directions, disjoint."""
    return _tokens(usage, input_includes_cache)


def _p(input_per_m: float, output_per_m: float, cache_read_per_m: float,
       cache_write_per_m: float = 0.0) -> ModelPrice:
    return ModelPrice(Prices(input_per_m / 1000, output_per_m / 1000, cache_read_per_m / 1000,
                             cache_write_per_m / 1000))


# Z.AI list prices per 1M tokens (see the module docstring): defaults to replace.
DEFAULT_PRICES: Final = PriceTable(models={
    "glm-4.6": _p(0.6, 2.2, 0.11),
    "glm-4.5": _p(0.6, 2.2, 0.11),
    "glm-4.5-x": _p(2.2, 8.9, 0.45),
    "glm-4.5-air": _p(0.2, 1.1, 0.03),
    "glm-4.5-airx": _p(1.1, 4.5, 0.22),
    "glm-4.5-flash": _p(0.0, 0.0, 0.0),
    "glm-4.5v": _p(0.6, 1.8, 0.11),
    "glm-4.6v": _p(0.3, 0.9, 0.05),
    "glm-4-32b-0414-128k": _p(0.1, 0.1, 0.1),
})


# ---- the price file -----------------------------------------------------------------

def _price(where: str, raw: object, problems: list[str]) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        problems.append(f"{where}: must be a number (USD per 1K tokens)")
        return None
    value = float(raw)
    if not math.isfinite(value) or not 0 <= value <= _MAX_PRICE:
        problems.append(f"{where}: must be between 0 and {_MAX_PRICE:g} USD per 1K tokens")
        return None
    return value


def _prices(where: str, raw: Mapping[str, object], base: Prices | None,
            problems: list[str]) -> Prices | None:
    got: dict[str, float] = {}
    ok = True
    for name, value in raw.items():
        if name not in DIRECTIONS:
            problems.append(f"{where}.{name}: unknown key (known: {', '.join(DIRECTIONS)})")
            ok = False
            continue
        price = _price(f"{where}.{name}", value, problems)
        if price is None:
            ok = False
        else:
            got[name] = price
    if base is None:
        missing = [d for d in DIRECTIONS if d not in got and d not in raw]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            return None
    if not ok:
        return None
    if base is None:
        return Prices(**got)
    return Prices(**{d: got.get(d, getattr(base, d)) for d in DIRECTIONS})


def _model(where: str, raw: object, problems: list[str]) -> ModelPrice | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return None
    flat = {k: v for k, v in raw.items() if k not in ("peak", "off_peak")}
    standard = _prices(where, flat, None, problems)
    tiers: dict[str, Prices | None] = {}
    for tier in ("peak", "off_peak"):
        if tier in raw:
            sub = raw[tier]
            if not isinstance(sub, dict):
                problems.append(f"{where}.{tier}: must be a table")
                continue
            if standard is not None:
                tiers[tier] = _prices(f"{where}.{tier}", sub, standard, problems)
    if standard is None:
        return None
    return ModelPrice(standard, tiers.get("peak"), tiers.get("off_peak"))


def _hours(raw: object, problems: list[str]) -> tuple[int, int] | None:
    m = _HOURS_RE.fullmatch(raw) if isinstance(raw, str) else None
    if m is None:
        problems.append("peak_hours: must be \"HH:MM-HH:MM\" (Beijing time, 24 h)")
        return None
    start = int(m[1]) * 60 + int(m[2])
    end = int(m[3]) * 60 + int(m[4])
    if end > 1440 or start == end:
        problems.append("peak_hours: must be a non-empty window within one day")
        return None
    return start, end


def parse_prices(doc: Mapping[str, object]) -> PriceTable:
    """A price table from a parsed file; raises PriceFileError listing every problem."""
    problems: list[str] = []
    for key in doc:
        if key not in ("peak_hours", "models"):
            problems.append(f"{key}: unknown key (known: peak_hours, models)")
    hours = _hours(doc.get("peak_hours", DEFAULT_PEAK_HOURS), problems)
    raw_models = doc.get("models")
    models: dict[str, ModelPrice] = {}
    fallback: ModelPrice | None = None
    if not isinstance(raw_models, dict) or not raw_models:
        problems.append("models: must be a non-empty table of model name -> prices")
    else:
        for name, raw in raw_models.items():
            entry = _model(f"models.{name}", raw, problems)
            if entry is None:
                continue
            if name == "*":
                fallback = entry
            else:
                models[name] = entry
    if problems or hours is None:
        raise PriceFileError(problems)
    return PriceTable(models=models, peak_start_min=hours[0], peak_end_min=hours[1],
                      fallback=fallback)


def load_prices(path: str) -> PriceTable:
    """Read a TOML price file (JSON when the name ends in ``.json``)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise PriceFileError([f"cannot read: {exc.strerror or exc}"]) from None
    try:
        doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError, JSONDecodeError
        raise PriceFileError([f"not valid {'JSON' if path.endswith('.json') else 'TOML'}: {exc}"]) \
            from None
    if not isinstance(doc, dict):
        raise PriceFileError(["must hold a table / JSON object"])
    return parse_prices(doc)


def price_file(raw: object, text: bool) -> str:
    """The ``tokens.price_file`` setting's parser: an existing, valid price file."""
    path = os.path.expanduser(string(raw))
    if not path or any(c in path for c in "\0\n"):
        raise Invalid("not a usable path")
    if not os.path.isfile(path):
        raise Invalid("not an existing file")
    try:
        load_prices(path)
    except PriceFileError as exc:
        raise Invalid(f"invalid price file: {exc}") from None
    return path

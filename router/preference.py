"""``X-Carbon-Preference``: how a client steers its request.

The header is an HTTP Structured Field Dictionary (RFC 8941), parsed with ``http-sfv``::

    X-Carbon-Preference: mode=carbon, max-latency-ms=800, regions=("eu-*")

Keys (all optional):

===============  ====================================  =========================================
key              value                                 meaning
===============  ====================================  =========================================
mode             token: balanced | carbon | cost       weight 0.5 | 1.0 | 0.0 (default balanced)
weight           decimal 0.0 - 1.0                     0 = price only, 1 = carbon only
max-latency-ms   integer or decimal > 0                first-token budget: RTT + queue wait +
                                                       prefill (the replica model's)
max-tpot-ms      integer or decimal > 0                time per output token at the batch the
                                                       request joins (the replica model's ITL)
regions          inner list of strings or tokens       allow-list of region names / residency
                                                       tags, glob patterns (``"eu-*"``)
defer            integer >= 0 (seconds)                how long the request may wait for a
                                                       cleaner window; 0 = run now
max-carbon-g     decimal > 0                           refuse rather than emit more per request
===============  ====================================  =========================================

``mode`` and ``weight`` are exclusive. Any problem raises :class:`PreferenceError`, whose
message says what is allowed; the HTTP layer answers it with 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from http_sfv.dictionary import Dictionary
from http_sfv.item import InnerList

from router.errors import RequestError

MODES = {"balanced": 0.5, "carbon": 1.0, "cost": 0.0}
MAX_DEFER_S = 7 * 86400
ALLOWED = (
    "allowed keys: mode (balanced|carbon|cost), weight (0.0-1.0), max-latency-ms (> 0), "
    "max-tpot-ms (> 0), "
    'regions (inner list of names or globs, e.g. ("eu-*")), defer (seconds >= 0), '
    "max-carbon-g (> 0)"
)
HEADER = "X-Carbon-Preference"


class PreferenceError(RequestError, ValueError):
    """A malformed or out-of-range ``X-Carbon-Preference``."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"invalid {HEADER}: {problem}; {ALLOWED}", param=HEADER)
        self.problem = problem


@dataclass(frozen=True)
class Preference:
    weight: float = 0.5
    max_latency_ms: float | None = None
    max_tpot_ms: float | None = None
    regions: tuple[str, ...] = field(default_factory=tuple)
    defer_s: float = 0.0
    max_carbon_g: float | None = None
    mode: str | None = "balanced"


def _number(key: str, item: Any, *, low: float, high: float = math.inf, low_open: bool) -> float:
    value = getattr(item, "value", None)  # an inner list has none
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise PreferenceError(f"{key} must be a number, got {value!r}")
    x = float(value)
    if not (x > low if low_open else x >= low) or x > high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != math.inf:
            bound += f" and <= {high:g}"
        raise PreferenceError(f"{key} must be {bound}, got {x:g}")
    return x


def parse_preference(
    header: str | None, *, default_weight: float = 0.5, default_max_latency_ms: float | None = None
) -> Preference:
    """Parse the header value (``None`` or empty: the defaults; the operator's first-token
    budget, ``policy.max_latency_ms``, holds where the header gives none)."""
    if header is None or not header.strip():
        return Preference(weight=default_weight, mode=None, max_latency_ms=default_max_latency_ms)
    try:
        raw = header.encode("ascii")
    except UnicodeEncodeError as e:
        raise PreferenceError("must be ASCII (RFC 8941)") from e
    parsed = Dictionary()
    try:
        parsed.parse(raw)
    except (ValueError, TypeError, IndexError, KeyError) as e:  # http-sfv's parse errors
        raise PreferenceError(f"not a structured-field dictionary ({str(e) or 'malformed'})") from e
    out: dict[str, Any] = {}
    for key, member in parsed.items():
        if key == "mode":
            value = getattr(member, "value", None)
            if not isinstance(value, str) or str(value) not in MODES:
                raise PreferenceError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
            out["mode"] = str(value)
        elif key == "weight":
            out["weight"] = _number(key, member, low=0.0, high=1.0, low_open=False)
        elif key == "max-latency-ms":
            out["max_latency_ms"] = _number(key, member, low=0.0, low_open=True)
        elif key == "max-tpot-ms":
            out["max_tpot_ms"] = _number(key, member, low=0.0, low_open=True)
        elif key == "defer":
            out["defer_s"] = _number(key, member, low=0.0, high=MAX_DEFER_S, low_open=False)
        elif key == "max-carbon-g":
            out["max_carbon_g"] = _number(key, member, low=0.0, low_open=True)
        elif key == "regions":
            items = list(member) if isinstance(member, InnerList) else [member]
            names = []
            for it in items:
                v = getattr(it, "value", None)
                if not isinstance(v, str) or not str(v):
                    raise PreferenceError(f"regions must hold strings or tokens, got {v!r}")
                names.append(str(v))
            if not names:
                raise PreferenceError("regions must not be empty")
            out["regions"] = tuple(names)
        else:
            raise PreferenceError(f"unknown key {key!r}")
    if "mode" in out and "weight" in out:
        raise PreferenceError("give mode or weight, not both")
    mode = out.pop("mode", None)
    weight = MODES[mode] if mode else out.pop("weight", default_weight)
    out.setdefault("max_latency_ms", default_max_latency_ms)
    return Preference(weight=weight, mode=mode, **out)

"""The exception root of the ``router`` package.

RouterError
├── PriceError        (router.billing) no price for a region at a time
├── LedgerError       (router.ledger) the ledger file cannot be opened, migrated or written
└── AttributionError  (router.metering.attribution, also a ValueError) events out of order
"""

from __future__ import annotations


class RouterError(Exception):
    """Root of every error raised by :mod:`router`."""

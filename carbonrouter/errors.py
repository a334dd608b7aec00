"""The one exception root of carbon-router.

CarbonRouterError
├── RegionsError      (regions.config) config, backends, meters; ConfigError names file/line/field
├── UpstreamError     (regions.http1) an upstream HTTP exchange failed at the transport level
├── ForecastingError  (forecasting.errors) datasets, forecasters, carbon sources
└── RouterError       (router.errors) the request path, billing, ledger, scheduling

Catch ``CarbonRouterError`` to catch anything the project raises on purpose; anything else
escaping is a bug. Domain code raises these, never HTTP statuses: :mod:`router.http.errors`
maps them to OpenAI-style HTTP errors in one table.
"""

from __future__ import annotations


class CarbonRouterError(Exception):
    """Root of every error carbon-router raises on purpose."""

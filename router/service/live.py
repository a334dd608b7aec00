"""What the request path reads from its config, swapped as one by a reload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forecasting.energy import EnergyPredictor
from forecasting.sources.base import CarbonSource
from regions.config import Config
from router.service.routing import Router
from router.service.tenants import Budgets, Tenants


@dataclass
class Live:
    """Config, router (policy, prices, carbon sources), tenants and budgets. A request reads
    ``live.router`` once at its start and keeps what it got; a reload builds a new ``Live``."""

    config_path: Path
    config: Config
    router: Router
    tenants: Tenants
    budgets: Budgets
    billing_json: str  # the tariff's config, sent with proxied bills to be priced remotely

    @classmethod
    def build(
        cls,
        config_path: Path,
        config: Config,
        sources: dict[str, CarbonSource],
        predictor: EnergyPredictor,
    ) -> Live:
        router = Router.build(config, sources, predictor, base_dir=config_path.parent)
        return cls(
            config_path,
            config,
            router,
            Tenants(config.tenants),
            Budgets(config.tenants),
            config.billing.model_dump_json(),
        )

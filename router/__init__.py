"""carbon-router: HTTP ingress, routing policy, scheduler, metering, ledger, billing, CLI."""

__version__ = "0.1.0"

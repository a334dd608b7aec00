"""Metering, plain asyncio and no Ray: per-request energy attribution, the metered in-process
replica, attribution for proxied replicas, and the outbox that carries billed rows to the
ledger. The Ray metering actor that owns the ledger wraps these in the Ray Serve app."""

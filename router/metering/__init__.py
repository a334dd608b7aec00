"""Metering: per-request energy attribution (domain, no Ray) and, later, the Ray actor."""

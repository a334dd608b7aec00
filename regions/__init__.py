"""Regions: the YAML region/pricing config, replica backends, power meters, placement.

Exceptions derive from :class:`regions.config.RegionsError`; an invalid config raises
:class:`regions.config.ConfigError`, whose message names file, line and field.
"""

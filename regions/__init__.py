"""Regions: the YAML region/pricing config, replica backends (llama.cpp in process,
OpenAI-compatible servers over a lean HTTP/1.1 client, a fake server), power meters, and the
measured calibration constants (:mod:`regions.calibration`).

Exceptions derive from :class:`regions.config.RegionsError`; an invalid config raises
:class:`regions.config.ConfigError`, whose message names file, line and field.
"""

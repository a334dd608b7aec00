"""Measured constants shared by the layers that attribute and predict energy.

``PREFILL_WEIGHT``: the energy of one prompt (prefill) token relative to one output (decode)
token. The attributor splits each metered interval by decode tokens + ``PREFILL_WEIGHT`` x
prefill tokens (:mod:`router.metering.attribution`); the energy predictor prices a request as
J per output token x (output + ``PREFILL_WEIGHT`` x prompt tokens) (:mod:`forecasting.energy`);
a replica's YAML ``prefill_weight`` (:class:`regions.config.Replica`) defaults to it and
overrides it for that replica.

Where the number comes from: ``benchmarks/attribution_local.py`` runs 15 requests one at a
time on the embedded SmolLM2-135M-Instruct (Q4_1, llama.cpp, 2 threads; prompts of 58-862
tokens, 16-128 output tokens), meters each with the CPU-time model, and fits
E = a x prompt + b x output + c by least squares; the weight is a / b. On the 2-core development
machine two runs gave 0.438 (a = 0.165, b = 0.376 J/token) and 0.410 (0.177, 0.431); a third, on
a machine loaded by other jobs, fitted negative J per token and was discarded. The default is
the mean of the two, rounded: 0.42. (The CPU-time model meters CPU seconds, so on CPU the weight
is the CPU time of a prompt token relative to an output token: llama.cpp batches the prompt.)

ML.ENERGY (``energy/mlenergy_v2``, ``mlenergy_v3``) cannot give a GPU figure: it publishes
energy per request and per output token with each task's prefill folded in, and no prompt
lengths. So for a GPU replica, whose prior J/token already carries a typical prefill, this
default counts prompt tokens on top of that; set ``prefill_weight`` on such a replica in YAML
from its own measurement.
"""

from __future__ import annotations

PREFILL_WEIGHT = 0.42

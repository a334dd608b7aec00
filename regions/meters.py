"""The ``PowerMeter`` seam: cumulative energy of a replica's hardware.

Conventions
-----------
- ``read()`` returns a :class:`MeterReading`: ``t_s`` from a monotonic clock (seconds) and
  ``energy_j``, the joules used since the meter was opened. ``energy_j`` never decreases: counter
  resets (driver reload) and wrap-arounds are absorbed, not passed on as negative energy.
- ``energy_source`` is ``"measured"`` for hardware counters (NVML, RAPL) and ``"estimated"`` for
  models (the CPU-time model). Bills carry it.

Implementations: :class:`NvmlMeter` (NVIDIA GPUs: the total-energy counter, or integrated power
polling where the counter is unsupported), :class:`RaplMeter` (Intel/AMD RAPL via powercap
sysfs), :class:`CpuModelMeter` (process CPU seconds x watts per core + an idle share),
:class:`FakeMeter` (tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from regions.config import RegionsError

log = logging.getLogger(__name__)

EnergySource = Literal["measured", "estimated"]
MonotonicClock = Callable[[], float]


class MeterError(RegionsError):
    """A power meter cannot be opened or read."""


@dataclass(frozen=True, slots=True)
class MeterReading:
    t_s: float  # monotonic seconds
    energy_j: float  # cumulative joules since the meter was opened


class PowerMeter(ABC):
    energy_source: EnergySource

    @abstractmethod
    def read(self) -> MeterReading:
        """Cumulative joules since open, with the monotonic time of the reading."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles and stop background threads."""


class _Accumulator:
    """Turns a raw counter that may reset or wrap into a monotonic total.

    ``wrap`` is the counter's range (RAPL ``max_energy_range_uj``); without one, a counter that
    goes backwards is taken to have reset to zero, so the energy since the reset is its value.
    """

    def __init__(self, first: float, wrap: float | None = None) -> None:
        self.last = first
        self.total = 0.0
        self.wrap = wrap
        self.resets = 0

    def update(self, raw: float) -> float:
        if raw >= self.last:
            self.total += raw - self.last
        elif self.wrap:
            self.total += raw + self.wrap - self.last
        else:
            self.resets += 1
            log.warning(
                "energy counter went back from %s to %s: reset; counting from 0", self.last, raw
            )
            self.total += raw
        self.last = raw
        return self.total


# ---- NVML ---------------------------------------------------------------------------------------


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:  # pragma: no cover - nvidia-ml-py is a core dependency
        raise MeterError("the pynvml module is missing; pip install nvidia-ml-py") from e
    return pynvml


class NvmlMeter(PowerMeter):
    """Energy of the GPUs at ``gpu_indices`` from NVML.

    Uses ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load, Volta and newer). Where a
    device does not support it, a background thread polls ``nvmlDeviceGetPowerUsage`` (mW) every
    ``poll_interval_s`` and integrates it (trapezoids); those readings are still ``measured``.
    ``nvml`` is the module (``pynvml``); tests pass a thin fake with the same functions.
    """

    energy_source: EnergySource = "measured"

    def __init__(
        self,
        gpu_indices: Sequence[int] = (0,),
        *,
        nvml: Any = None,
        poll_interval_s: float = 0.05,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        self._nvml = nvml or _load_pynvml()
        self._clock = clock
        try:
            self._nvml.nvmlInit()
        except Exception as e:
            raise MeterError(
                f"NVML is not available ({e}); this needs an NVIDIA driver. On a machine without "
                "a GPU set the replica's meter to 'cpu' (estimated) or 'rapl'"
            ) from e
        self._counters: list[tuple[Any, _Accumulator]] = []
        self._polled: list[Any] = []
        try:
            count = self._nvml.nvmlDeviceGetCount()
            for i in gpu_indices:
                if not 0 <= i < count:
                    raise MeterError(f"GPU index {i} does not exist; this machine has {count}")
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                try:
                    first = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h))
                    self._counters.append((h, _Accumulator(first)))
                except self._nvml.NVMLError as e:
                    log.info("GPU %d has no energy counter (%s); polling power instead", i, e)
                    self._polled.append(h)
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML failed while opening GPUs {list(gpu_indices)}: {e}") from e
        self._lock = threading.Lock()
        self._polled_j = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._polled:
            self._last_poll = (self._clock(), self._power_w())
            self._thread = threading.Thread(
                target=self._poll, args=(poll_interval_s,), name="nvml-power-poll", daemon=True
            )
            self._thread.start()

    def _power_w(self) -> float:
        return float(sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._polled)) / 1000.0

    def _poll_once(self) -> None:
        t, p = self._clock(), self._power_w()
        with self._lock:
            t0, p0 = self._last_poll
            self._polled_j += 0.5 * (p0 + p) * max(0.0, t - t0)
            self._last_poll = (t, p)

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self._poll_once()
            except self._nvml.NVMLError as e:  # keep the last integral; say so
                log.warning("NVML power poll failed: %s", e)

    def read(self) -> MeterReading:
        t = self._clock()
        try:
            counted = sum(
                acc.update(float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h))) / 1000.0
                for h, acc in self._counters
            )
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML energy read failed: {e}") from e
        polled = 0.0
        if self._polled:
            self._poll_once()
            with self._lock:
                polled = self._polled_j
        return MeterReading(t, counted + polled)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        try:
            self._nvml.nvmlShutdown()
        except Exception as e:  # shutting down: report, nothing else to do
            log.debug("nvmlShutdown: %s", e)


# ---- RAPL ---------------------------------------------------------------------------------------


class RaplMeter(PowerMeter):
    """CPU package energy from Linux powercap RAPL (``energy_uj`` per package domain)."""

    energy_source: EnergySource = "measured"

    def __init__(
        self, root: str | Path = "/sys/class/powercap", *, clock: MonotonicClock = time.monotonic
    ) -> None:
        self._clock = clock
        base = Path(root)
        domains = sorted(p for p in base.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not domains:
            raise MeterError(
                f"no RAPL package domains under {base}; use meter 'cpu' (estimated) instead"
            )
        self._domains: list[tuple[Path, _Accumulator]] = []
        for d in domains:
            try:
                first = float((d / "energy_uj").read_text())
                wrap = float((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError) as e:
                raise MeterError(
                    f"cannot read {d / 'energy_uj'} ({e}); RAPL needs read access "
                    "(root, or chmod the file); or use meter 'cpu'"
                ) from e
            self._domains.append((d / "energy_uj", _Accumulator(first, wrap)))

    def read(self) -> MeterReading:
        t = self._clock()
        try:
            uj = sum(acc.update(float(p.read_text())) for p, acc in self._domains)
        except (OSError, ValueError) as e:
            raise MeterError(f"RAPL read failed: {e}") from e
        return MeterReading(t, uj / 1e6)


# ---- CPU-time model -----------------------------------------------------------------------------


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all threads (llama.cpp's included)."""
    t = os.times()
    return t.user + t.system


class CpuModelMeter(PowerMeter):
    """An estimate where no counter is readable: CPU seconds x ``watts_per_core`` plus a
    constant ``idle_share`` of one core's watts for the wall time. Always ``estimated``.

    ``watts_per_core`` should be the package TDP divided by its cores (a 2-core slice of a
    30 W-per-core server CPU: 30).
    """

    energy_source: EnergySource = "estimated"

    def __init__(
        self,
        watts_per_core: float,
        *,
        idle_share: float = 0.1,
        cpu_seconds: Callable[[], float] = process_cpu_seconds,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        if watts_per_core <= 0 or not 0 <= idle_share <= 1:
            raise MeterError(
                f"watts_per_core must be > 0 and idle_share in [0, 1], got {watts_per_core}, "
                f"{idle_share}"
            )
        self.watts_per_core = watts_per_core
        self.idle_w = idle_share * watts_per_core
        self._cpu = cpu_seconds
        self._clock = clock
        self._t0 = clock()
        self._cpu_acc = _Accumulator(cpu_seconds())

    def read(self) -> MeterReading:
        t = self._clock()
        cpu_s = self._cpu_acc.update(self._cpu())
        return MeterReading(t, cpu_s * self.watts_per_core + (t - self._t0) * self.idle_w)


# ---- fake ---------------------------------------------------------------------------------------


class FakeMeter(PowerMeter):
    """A meter driven by the test: a constant ``power_w`` over its clock, plus explicit joules."""

    def __init__(
        self,
        power_w: float = 0.0,
        *,
        clock: MonotonicClock = time.monotonic,
        energy_source: EnergySource = "measured",
    ) -> None:
        self.power_w = power_w
        self.energy_source = energy_source
        self._clock = clock
        self._t_last = clock()
        self._energy_j = 0.0

    def add(self, joules: float) -> None:
        if joules < 0:
            raise MeterError("energy cannot be negative")
        self._energy_j += joules

    def read(self) -> MeterReading:
        t = self._clock()
        self._energy_j += self.power_w * max(0.0, t - self._t_last)
        self._t_last = t
        return MeterReading(t, self._energy_j)


def open_meter(
    kind: str, *, gpu_indices: Sequence[int] | None = None, watts_per_core: float = 15.0
) -> PowerMeter:
    """The meter a replica's config names (``nvml``, ``rapl`` or ``cpu``)."""
    if kind == "nvml":
        return NvmlMeter(gpu_indices or (0,))
    if kind == "rapl":
        return RaplMeter()
    if kind == "cpu":
        return CpuModelMeter(watts_per_core)
    raise MeterError(f"unknown meter {kind!r}; use nvml, rapl or cpu")

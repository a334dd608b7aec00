"""A thin fake of the pynvml functions the NVML meter calls, with NVML's units (mJ, mW)."""

from __future__ import annotations

from dataclasses import dataclass


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's spelling
    pass


@dataclass
class FakeGpu:
    energy_mj: int = 0
    power_mw: int = 0
    has_counter: bool = True


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, *, present: bool = True) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.present = present
        self.initialized = False

    def nvmlInit(self) -> None:  # noqa: N802
        if not self.present:
            raise NVMLError("NVML Shared Library Not Found")
        self.initialized = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:  # noqa: N802
        return self.gpus[i]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:  # noqa: N802
        if not h.has_counter:
            raise NVMLError_NotSupported("Not Supported")
        return h.energy_mj

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:  # noqa: N802
        return h.power_mw

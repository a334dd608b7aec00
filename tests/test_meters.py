"""PowerMeter implementations: one contract, plus each meter's own failure modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from regions.meters import (
    CpuModelMeter,
    FakeMeter,
    MeterError,
    NvmlMeter,
    PowerMeter,
    RaplMeter,
)
from tests.fake_nvml import FakeGpu, FakeNvml


class Tick:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Drive:
    """Advances a meter's world by ``dt`` seconds at ``watts``: each kind in its own units."""

    def __init__(self, kind: str, tick: Tick, **parts: object) -> None:
        self.kind, self.tick, self.parts = kind, tick, parts

    def step(self, dt: float, watts: float) -> None:
        self.tick.t += dt
        if self.kind == "nvml":
            for g in self.parts["gpus"]:  # type: ignore[attr-defined]
                g.energy_mj += int(watts * dt * 1000)
                g.power_mw = int(watts * 1000)
        elif self.kind == "rapl":
            f: Path = self.parts["file"]  # type: ignore[assignment]
            f.write_text(str(int(float(f.read_text()) + watts * dt * 1e6)))
        elif self.kind == "cpu":
            self.parts["cpu"][0] += dt * watts / 10.0  # type: ignore[index]
        else:
            self.parts["meter"].power_w = watts  # type: ignore[attr-defined]


def make(kind: str, tmp_path: Path) -> tuple[PowerMeter, Drive]:
    tick = Tick()
    if kind == "nvml":
        gpus = [FakeGpu(energy_mj=5_000_000), FakeGpu(energy_mj=7_000_000)]
        return NvmlMeter([0, 1], nvml=FakeNvml(gpus), clock=tick), Drive(kind, tick, gpus=gpus)
    if kind == "rapl":
        d = tmp_path / "intel-rapl:0"
        d.mkdir()
        (d / "energy_uj").write_text("1000")
        (d / "max_energy_range_uj").write_text("262143328850")
        return RaplMeter(tmp_path, clock=tick), Drive(kind, tick, file=d / "energy_uj")
    if kind == "cpu":
        cpu = [3.0]
        m = CpuModelMeter(10.0, idle_share=0.0, cpu_seconds=lambda: cpu[0], clock=tick)
        return m, Drive(kind, tick, cpu=cpu)
    fake = FakeMeter(clock=tick)
    return fake, Drive(kind, tick, meter=fake)


@pytest.mark.parametrize("kind", ["nvml", "rapl", "cpu", "fake"])
def test_meter_contract(kind: str, tmp_path: Path) -> None:
    meter, drive = make(kind, tmp_path)
    first = meter.read()
    assert first.energy_j == pytest.approx(0.0, abs=1e-9)
    drive.step(2.0, 100.0)
    second = meter.read()
    gpus = 2 if kind == "nvml" else 1
    assert second.t_s - first.t_s == pytest.approx(2.0)
    assert second.energy_j == pytest.approx(200.0 * gpus, rel=1e-6)
    drive.step(1.0, 0.0)
    assert meter.read().energy_j >= second.energy_j  # monotonic
    assert meter.energy_source == ("estimated" if kind == "cpu" else "measured")
    meter.close()


def test_nvml_counter_reset_never_gives_negative_energy() -> None:
    gpu = FakeGpu(energy_mj=9_000_000)
    meter = NvmlMeter([0], nvml=FakeNvml([gpu]), clock=Tick())
    gpu.energy_mj += 50_000
    assert meter.read().energy_j == pytest.approx(50.0)
    gpu.energy_mj = 20_000  # driver reloaded: counter restarts near 0
    assert meter.read().energy_j == pytest.approx(70.0)
    gpu.energy_mj += 10_000
    assert meter.read().energy_j == pytest.approx(80.0)


def test_nvml_polls_power_where_the_counter_is_unsupported() -> None:
    tick = Tick()
    gpu = FakeGpu(has_counter=False, power_mw=300_000)
    meter = NvmlMeter([0], nvml=FakeNvml([gpu]), clock=tick, poll_interval_s=3600)
    tick.t += 10
    assert meter.read().energy_j == pytest.approx(3000.0)  # 300 W x 10 s
    gpu.power_mw = 100_000
    tick.t += 10
    assert meter.read().energy_j == pytest.approx(3000.0 + 0.5 * (300 + 100) * 10)
    assert meter.energy_source == "measured"
    meter.close()


def test_nvml_absent_is_a_clear_error() -> None:
    with pytest.raises(MeterError, match="NVIDIA driver.*'cpu'"):
        NvmlMeter([0], nvml=FakeNvml(present=False))
    with pytest.raises(MeterError, match="GPU index 3 does not exist; this machine has 1"):
        NvmlMeter([3], nvml=FakeNvml())


def test_rapl_wraps_around(tmp_path: Path) -> None:
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text(str(999_000_000))
    (d / "max_energy_range_uj").write_text(str(1_000_000_000))
    meter = RaplMeter(tmp_path, clock=Tick())
    (d / "energy_uj").write_text(str(4_000_000))  # wrapped past 1e9 uJ
    assert meter.read().energy_j == pytest.approx(5.0)


def test_rapl_missing_says_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="no RAPL package domains.*'cpu'"):
        RaplMeter(tmp_path)


def test_cpu_model_counts_idle_share() -> None:
    tick, cpu = Tick(), [0.0]
    meter = CpuModelMeter(20.0, idle_share=0.25, cpu_seconds=lambda: cpu[0], clock=tick)
    tick.t += 10
    cpu[0] += 4
    assert meter.read().energy_j == pytest.approx(4 * 20 + 10 * 5)


def test_cpu_model_on_this_process_is_monotonic_and_positive() -> None:
    meter = CpuModelMeter(15.0)
    a = meter.read()
    sum(i * i for i in range(200_000))  # burn some CPU
    b = meter.read()
    assert b.energy_j > a.energy_j >= 0 and b.t_s > a.t_s

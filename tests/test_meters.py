from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from envs.measure.meters import (
    CpuTimeEnergy,
    FakeClock,
    Measurement,
    Meter,
    MeterUnavailableError,
    MixedSourceError,
    NvmlEnergy,
    RaplEnergy,
    combine,
    device_tag,
    latency_stats,
)


class FakeNvml:
    """pynvml's energy functions over a fake clock: constant power, counter updated every ``period`` s."""

    class NVMLError(Exception):
        pass

    def __init__(self, clock: FakeClock, power_w: float, period: float = 0.05, fail: bool = False) -> None:
        self.clock, self.power_w, self.period, self.fail = clock, power_w, period, fail
        self.reads = 0

    def nvmlInit(self) -> None:
        if self.fail:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self.reads += 1
        updated = math.floor(self.clock() / self.period + 1e-9) * self.period  # last counter update
        return int(round(updated * self.power_w * 1000))  # millijoules


def scripted(clock: FakeClock, durations: list[float]):
    """A fake workload: the i-th call takes durations[i % len] seconds of fake time."""
    calls = {"n": 0}

    def fn() -> None:
        clock.advance(durations[calls["n"] % len(durations)])
        calls["n"] += 1

    return fn, calls


def test_latency_stats_estimator():
    st = latency_stats([0.005, 0.001, 0.003, 0.002, 0.004])
    assert st["p50"] == pytest.approx(0.003)
    assert st["p95"] == pytest.approx(0.0048)  # linear interpolation between 4 ms and 5 ms
    assert st["mean"] == pytest.approx(0.003)
    assert st["cv"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / 3)
    assert latency_stats([0.5])["cv"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        latency_stats([])
    with pytest.raises(ValueError, match="non-negative"):
        latency_stats([0.1, -0.1])


def test_meter_warmup_repeats_and_noise_flag_with_fake_clock():
    clock = FakeClock()
    # two warm-ups (slow: first-call effects), then five timed calls
    fn, calls = scripted(clock, [1.0, 1.0, 0.001, 0.002, 0.003, 0.004, 0.005])
    meter = Meter(warmup=2, repeats=5, cv_bound=0.1, energy="off", clock=clock, memory=False)
    m = meter.measure(fn, tokens=100)
    assert calls["n"] == 7
    assert m.samples_s == pytest.approx((0.001, 0.002, 0.003, 0.004, 0.005))
    assert m.latency_p50_s == pytest.approx(0.003)
    assert m.latency_p95_s == pytest.approx(0.0048)
    assert m.throughput_tok_s == pytest.approx(100 / 0.003)
    assert m.noisy and m.latency_cv > 0.1
    assert m.source == "measured" and m.energy_j is None and m.energy_source is None
    assert m.device == device_tag("cpu") and m.device.startswith("cpu:")
    assert m.peak_memory_bytes is None and m.memory_source is None
    d = m.to_dict()
    assert d["samples_s"] == list(m.samples_s) and d["noisy"] is True


def test_steady_workload_is_not_noisy():
    clock = FakeClock()
    fn, _ = scripted(clock, [0.010, 0.0101, 0.0099])
    m = Meter(warmup=0, repeats=6, energy="off", clock=clock, memory=False).measure(fn)
    assert not m.noisy and m.latency_cv < 0.02 and m.throughput_tok_s == 0.0


def test_measure_stable_remeasures_until_quiet():
    clock = FakeClock()
    # first measurement noisy (1 ms vs 9 ms), second steady
    fn, calls = scripted(clock, [0.001, 0.009, 0.001, 0.009, 0.005, 0.005, 0.005, 0.005])
    meter = Meter(warmup=0, repeats=4, cv_bound=0.1, energy="off", clock=clock, memory=False)
    m = meter.measure_stable(fn, max_attempts=3)
    assert m.attempts == 2 and not m.noisy and m.latency_p50_s == pytest.approx(0.005)
    assert calls["n"] == 8
    # always noisy: gives up after max_attempts, keeps the least noisy, still flagged
    fn2, calls2 = scripted(clock, [0.001, 0.009])
    m2 = meter.measure_stable(fn2, max_attempts=2)
    assert m2.attempts == 2 and m2.noisy and calls2["n"] == 8


def test_nvml_energy_window_repeats_workload_to_100ms():
    clock = FakeClock(t=1.0)  # on a counter update
    nvml = FakeNvml(clock, power_w=200.0, period=1 / 64)
    fn, calls = scripted(clock, [1 / 64])  # ~16 ms calls, exact in binary
    meter = Meter(warmup=1, repeats=3, energy="nvml", nvml=nvml, clock=clock, memory=False)
    assert meter.energy_reader.name == "nvml"
    m = meter.measure(fn)
    # the window needs 7 calls to reach 100 ms (6 make 93.75 ms); 200 W x 1/64 s = 3.125 J per call
    assert m.energy_calls == 7 and m.energy_window_s == pytest.approx(7 / 64)
    assert calls["n"] == 1 + 3 + 7
    assert m.energy_j == pytest.approx(3.125)
    assert m.energy_source == "measured" and m.energy_meter == "nvml" and m.source == "measured"


def test_energy_window_longer_than_counter_period_bounds_quantisation():
    clock = FakeClock(t=1.013)  # between counter updates
    nvml = FakeNvml(clock, power_w=100.0, period=0.05)
    fn, _ = scripted(clock, [0.007])
    meter = Meter(warmup=0, repeats=1, energy_reader=NvmlEnergy(0, nvml), clock=clock, memory=False)
    m = meter.measure(fn)
    assert m.energy_window_s >= 0.1
    true = 100.0 * 0.007
    # the counter lags by < one period at each edge, so the error is at most one period's energy / calls
    assert abs(m.energy_j - true) <= 100.0 * 0.05 / m.energy_calls + 1e-9


def test_short_window_would_read_zero_energy_which_is_why_windows_exist():
    clock = FakeClock(t=1.0)
    nvml = FakeNvml(clock, power_w=100.0, period=0.05)
    reader = NvmlEnergy(0, nvml)
    e0 = reader.read()
    clock.advance(0.01)
    assert reader.read() - e0 == 0.0  # one 10 ms call reads no counter update


def test_explicit_nvml_without_driver_raises_with_fix():
    clock = FakeClock()
    with pytest.raises(MeterUnavailableError, match="energy='estimate'"):
        Meter(energy="nvml", nvml=FakeNvml(clock, 1.0, fail=True), clock=clock)


def test_estimate_is_labelled_estimated(tmp_path: Path):
    clock = FakeClock()
    cpu = FakeClock()

    def fn() -> None:
        clock.advance(0.02)
        cpu.advance(0.04)  # two busy threads

    meter = Meter(energy="auto", cpu_power_w=5.0, cpu_time=cpu, clock=clock, rapl_root=tmp_path, memory=False)
    m = meter.measure(fn)
    assert m.energy_source == "estimated" and m.energy_meter == "cpu-time-estimate"
    assert m.source == "measured"  # latency is still a measurement, and says so separately
    assert m.energy_j == pytest.approx(0.04 * 5.0)
    assert meter.describe()["power_w"] == 5.0


def _fake_rapl(root: Path, value: int, max_range: int = 1000_000) -> Path:
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text("package-0")
    (d / "max_energy_range_uj").write_text(str(max_range))
    (d / "energy_uj").write_text(str(value))
    sub = root / "intel-rapl:0:0"  # a sub-domain: must not be counted twice
    sub.mkdir(exist_ok=True)
    (sub / "energy_uj").write_text("0")
    return d / "energy_uj"


def test_rapl_reader_measures_and_unwraps(tmp_path: Path):
    counter = _fake_rapl(tmp_path, 990_000)
    clock = FakeClock()

    def fn() -> None:
        clock.advance(0.03125)  # exact in binary: 4 calls make a 125 ms window
        now = int(counter.read_text())
        counter.write_text(str((now + 5_000) % 1000_000))  # 5 mJ per call, wrapping at 1 J

    meter = Meter(energy="auto", rapl_root=tmp_path, clock=clock, memory=False)
    assert isinstance(meter.energy_reader, RaplEnergy)
    m = meter.measure(fn)
    assert m.energy_source == "measured" and m.energy_meter == "rapl"
    assert m.energy_calls == 4 and m.energy_j == pytest.approx(0.005)


def test_explicit_rapl_without_counters_raises(tmp_path: Path):
    with pytest.raises(MeterUnavailableError, match="energy='estimate'"):
        Meter(energy="rapl", rapl_root=tmp_path / "none")


def _m(energy_source: str | None, device: str = "cpu:x", samples=(0.01, 0.02)) -> Measurement:
    st = latency_stats(samples)
    return Measurement(
        st["p50"], st["p95"], st["mean"], st["cv"], len(samples), 10, 10 / st["p50"], None, None,
        None if energy_source is None else 1.0, energy_source, "measured", device, st["cv"] > 0.1,
        samples_s=tuple(samples), energy_calls=0 if energy_source is None else 4,
    )  # fmt: skip


def test_combine_pools_same_source_and_refuses_mixing():
    pooled = combine([_m("measured", samples=(0.01, 0.03)), _m("measured", samples=(0.02,))])
    assert pooled.repeats == 3 and pooled.latency_p50_s == pytest.approx(0.02)
    assert pooled.energy_j == pytest.approx(1.0) and pooled.energy_calls == 8
    with pytest.raises(MixedSourceError, match="energy_source"):
        combine([_m("measured"), _m("estimated")])
    with pytest.raises(MixedSourceError, match="device"):
        combine([_m("measured", "cpu:a"), _m("measured", "cpu:b")])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="repeats"):
        Meter(repeats=0)
    with pytest.raises(ValueError, match="energy must be"):
        Meter(energy="joulemeter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu_power_w"):
        CpuTimeEnergy(0.0)


def test_real_cpu_measurement_sanity():
    a = np.random.default_rng(0).standard_normal((200, 200))
    meter = Meter("cpu", warmup=1, repeats=5, energy="auto")
    m = meter.measure(lambda: a @ a, tokens=200)
    assert m.latency_p50_s > 0 and m.latency_p95_s >= m.latency_p50_s and m.throughput_tok_s > 0
    assert m.peak_memory_bytes is not None and m.peak_memory_bytes > 0 and m.memory_source == "measured"
    assert m.energy_j is not None and m.energy_j >= 0 and m.energy_source in ("measured", "estimated")
    assert m.energy_window_s >= 0.1 and m.device.startswith("cpu:")


@pytest.mark.gpu
def test_cuda_events_measurement_sanity():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = torch.randn(2048, 2048, device="cuda")
    m = Meter("cuda", warmup=2, repeats=5).measure(lambda: a @ a, tokens=1)
    assert m.latency_p50_s > 0 and m.latency_p95_s >= m.latency_p50_s
    assert m.memory_kind == "cuda_max_allocated" and m.peak_memory_bytes >= a.numel() * 4
    assert m.device.startswith("cuda:") and m.energy_j is not None and m.energy_j > 0


def test_meter_times_with_its_own_threads_and_restores_the_process_setting():
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    want = 1 if before != 1 else 2
    meter = Meter(warmup=1, repeats=2, energy="off", memory=False, threads=want)
    meter.measure(lambda: seen.append(torch.get_num_threads()))
    assert seen == [want] * 3  # the warm-up and both timed calls
    assert torch.get_num_threads() == before
    assert meter.describe()["threads"] == want
    seen.clear()
    with pytest.raises(RuntimeError, match="boom"):
        Meter(warmup=0, repeats=1, energy="off", memory=False, threads=want).measure(
            lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        )
    assert torch.get_num_threads() == before  # restored when the workload raises, too
    Meter(warmup=0, repeats=1, energy="off", memory=False).measure(lambda: seen.append(torch.get_num_threads()))
    assert seen == [before]  # no setting: the process's threads
    with pytest.raises(ValueError, match="threads"):
        Meter(threads=0)


def test_busy_cores_elsewhere_sees_another_process_and_not_this_one():
    import subprocess
    import sys
    import time

    from envs.measure.meters import busy_cores_elsewhere

    with pytest.raises(ValueError, match="interval_s"):
        busy_cores_elsewhere(0)
    burner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        time.sleep(0.3)
        loaded = busy_cores_elsewhere(0.5)
    finally:
        burner.kill()
        burner.wait()
    assert loaded >= 0.6  # one core's busy loop (a shared CI machine may add more)

"""Meters: latency p50/p95, throughput, peak memory and energy of a callable, each figure labelled.

A :class:`Meter` runs a workload ``fn`` a few times untimed (warm-ups: caches, allocator, lazily
built kernels), then ``repeats`` timed times, and reports the median (p50) and p95 of those
latencies with their spread. Timing uses ``time.perf_counter`` on CPU and CUDA events with
synchronisation on GPU (the GPU runs asynchronously; a host clock without a sync would time the
launch, not the work).

Energy comes from the best counter the machine has:

- ``"nvml"``: the NVIDIA driver's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  millijoules since the driver loaded; Volta and newer). See :class:`NvmlEnergy` for why
  ``nvidia-ml-py`` is used directly rather than Zeus.
- ``"rapl"``: Intel/AMD RAPL package counters under ``/sys/class/powercap`` (often root-only since
  the PLATYPUS advisory; used only when readable).
- ``"estimate"``: process CPU time × a configured power per busy core (on GPU: wall time × a
  configured board power). Labelled ``"estimated"``.

Energy counters update every 20–100 ms, so one call of a fast workload would read zero or one
update. The meter therefore runs the workload back to back until the window is at least
``energy_window_s`` (100 ms by default) and divides the counter's increase by the number of calls.

Every figure carries its source: ``source`` for latency (always ``"measured"``), ``memory_source``
and ``energy_source`` (``"measured"`` or ``"estimated"``), and every :class:`Measurement` a
``device`` tag naming the hardware. Measurements whose sources or devices differ are never pooled
silently: :func:`combine` raises :class:`MixedSourceError`.

Noise: each measurement reports the coefficient of variation (CV = std / mean) of its timed
repeats; above ``cv_bound`` it is flagged ``noisy=True`` and :meth:`Meter.measure_stable`
re-measures up to a set number of times.

The clock, the NVML module, the RAPL folder and the energy reader are all injectable, so the
estimator, the windowing and the labelling are tested with fakes, deterministically.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from envs.data.files import versions_of

Clock = Callable[[], float]
EnergyMode = Literal["auto", "nvml", "rapl", "estimate", "off"]
SOURCES = ("measured", "estimated")
DEFAULT_CPU_POWER_W = 10.0  # per busy core; a mid-range server core under a dense matmul load
DEFAULT_GPU_POWER_W = 300.0  # board power used only when NVML is missing


class MixedSourceError(ValueError):
    """Raised when figures of different sources (measured/estimated) or devices would be combined."""


class MeterUnavailableError(RuntimeError):
    """Raised when an explicitly requested counter (NVML, RAPL, CUDA) is not usable here."""


# ---------------------------------------------------------------------------------------- device tags
def cpu_name() -> str:
    """The CPU model name (from ``/proc/cpuinfo`` where available)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_description() -> str:
    """The machine a figure was measured on, for people: the CUDA device, else the CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} cores"


TIMING_PACKAGES = ("torch", "transformers", "numpy", "prunegym")


def package_versions(names: Sequence[str] = TIMING_PACKAGES) -> dict[str, str]:
    """Versions of ``names`` (default: the packages timings depend on) and of Python; see :func:`versions_of`."""
    return versions_of(names)


@functools.cache
def runtime_code_hash() -> str:
    """Hash (16 hex) of the engine's source, ``envs/runtime/*.py``: the code every timed forward runs.

    A calibration fitted under other kernels (a faster norm, a fused MLP) predicts the old timings;
    the cost model files are keyed by it, so a changed engine is recalibrated instead of trusted.
    """
    import envs.runtime

    h = hashlib.sha256()
    for f in sorted(Path(envs.runtime.__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def device_tag(device: str = "cpu") -> str:
    """A string naming the hardware a figure was measured on, e.g. ``"cpu:Intel(R) Xeon(R) ..."``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        MeterUnavailableError: ``device`` is CUDA but no CUDA device is available.
        ValueError: Unknown device kind.
    """
    if device == "cpu":
        return f"cpu:{cpu_name()}"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MeterUnavailableError(
                f"device={device!r} but torch sees no CUDA device; use device='cpu' or install a CUDA build of torch"
            )
        idx = torch.device(device).index or 0
        return f"cuda:{torch.cuda.get_device_name(idx)}"
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# ---------------------------------------------------------------------------------------- energy readers
class EnergyReader(Protocol):
    """A cumulative energy counter in joules.

    Attributes:
        name: Short name of the counter (``"nvml"``, ``"rapl"``, ``"cpu-time-estimate"`` ...).
        source: ``"measured"`` for hardware counters, ``"estimated"`` for models.
    """

    name: str
    source: str

    def read(self) -> float:
        """Joules since an arbitrary origin (only differences are used)."""
        ...


class NvmlEnergy:
    """The NVIDIA driver's total-energy counter for one GPU, through ``nvidia-ml-py`` (``pynvml``).

    Why not Zeus: Zeus (``zeus-ml``) reads this same NVML counter and adds its own measurement
    windows and monitors (and dependencies). PruneGym needs only the counter at the two edges of a
    window that it already controls (the meter's repeat loop), plus an injectable fake for tests;
    ``nvidia-ml-py`` is NVIDIA's own binding, one pure-Python module with no dependencies, so the
    meter uses it directly.

    Args:
        index: GPU index as NVML numbers it (all GPUs, ignoring ``CUDA_VISIBLE_DEVICES``; when that
            variable remaps devices, build the reader with the right index and pass it to the meter
            as ``energy_reader``).
        nvml: The NVML module (``pynvml``); tests pass a fake with the same functions.

    Raises:
        MeterUnavailableError: NVML cannot start or the GPU has no energy counter (pre-Volta).
    """

    name = "nvml"
    source = "measured"

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise MeterUnavailableError("NVML energy needs `pip install nvidia-ml-py`") from exc
        self._nvml = nvml
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception as exc:  # pynvml raises its own NVMLError subclasses
            raise MeterUnavailableError(
                f"NVML energy counter unavailable for GPU {index} ({type(exc).__name__}: {exc}); it needs an "
                "NVIDIA driver and a Volta-or-newer GPU. Use energy='estimate' or energy='off'."
            ) from None

    def read(self) -> float:
        """Joules since the driver loaded (the counter is in millijoules)."""
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0


class RaplEnergy:
    """Package energy from RAPL counters under ``/sys/class/powercap`` (all CPU packages summed).

    Counters wrap at ``max_energy_range_uj``; each read unwraps against the previous one, so a
    window shorter than the wrap period (minutes) is measured correctly.

    Args:
        root: The powercap folder; tests pass a temporary folder with fake counters.

    Raises:
        MeterUnavailableError: No package domain, or its counter is not readable (often root-only).
    """

    name = "rapl"
    source = "measured"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        root = Path(root)
        # Top-level package domains are intel-rapl:N (sub-domains intel-rapl:N:M are inside them).
        domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []
        if not domains:
            raise MeterUnavailableError(
                f"no RAPL package domain under {root} (not an Intel/AMD CPU exposing powercap, or a VM); "
                "use energy='estimate'"
            )
        self._files = [d / "energy_uj" for d in domains]
        self._ranges = []
        for d in domains:
            try:
                self._ranges.append(int((d / "max_energy_range_uj").read_text()))
            except (OSError, ValueError):
                self._ranges.append(2**32)
        try:
            self._last = [self._raw(f) for f in self._files]
        except (OSError, ValueError) as exc:
            raise MeterUnavailableError(
                f"RAPL counters under {root} are not readable ({exc}); they are root-only on most kernels. "
                "Grant read access (e.g. `sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj`) or use "
                "energy='estimate'"
            ) from None
        self._total = 0.0

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text().strip())

    def read(self) -> float:
        """Joules since this reader was created, summed over packages, unwrapped."""
        for j, f in enumerate(self._files):
            now = self._raw(f)
            delta = now - self._last[j]
            if delta < 0:  # the counter wrapped
                delta += self._ranges[j]
            self._total += delta / 1e6
            self._last[j] = now
        return self._total


class CpuTimeEnergy:
    """Estimated energy: CPU seconds used by this process × watts per busy core.

    ``time.process_time`` sums the CPU time of all the process's threads, so a two-thread matmul
    that keeps both cores busy for 1 s counts 2 CPU-seconds.

    Args:
        power_w: Watts drawn per fully busy core (a configured figure, not a measurement).
        cpu_time: CPU-seconds clock; tests pass a fake.
    """

    name = "cpu-time-estimate"
    source = "estimated"

    def __init__(self, power_w: float = DEFAULT_CPU_POWER_W, cpu_time: Clock = time.process_time) -> None:
        if not power_w > 0:
            raise ValueError(f"cpu_power_w must be positive watts per busy core, got {power_w!r}")
        self.power_w = float(power_w)
        self._cpu_time = cpu_time

    def read(self) -> float:
        """Joules (estimated) since an arbitrary origin."""
        return self._cpu_time() * self.power_w


class WallTimeEnergy:
    """Estimated energy on a GPU without NVML: wall seconds × a configured board power."""

    name = "wall-time-estimate"
    source = "estimated"

    def __init__(self, power_w: float = DEFAULT_GPU_POWER_W, clock: Clock = time.perf_counter) -> None:
        if not power_w > 0:
            raise ValueError(f"gpu_power_w must be positive watts, got {power_w!r}")
        self.power_w = float(power_w)
        self._clock = clock

    def read(self) -> float:
        """Joules (estimated) since an arbitrary origin."""
        return self._clock() * self.power_w


# ---------------------------------------------------------------------------------------- memory
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _hwm_bytes() -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- results
@dataclass
class Measurement:
    """What :meth:`Meter.measure` returns; every figure labelled with its source.

    Attributes:
        latency_p50_s: Median latency of one call, seconds.
        latency_p95_s: 95th percentile (linear interpolation) of the timed repeats.
        latency_mean_s: Mean of the timed repeats.
        latency_cv: Coefficient of variation (sample std / mean) of the timed repeats; 0 for one repeat.
        repeats: Number of timed calls.
        tokens: Tokens one call processes (0 if not given).
        throughput_tok_s: ``tokens / latency_p50_s`` (0 when ``tokens`` is 0).
        peak_memory_bytes: Peak memory during the timed calls: process peak RSS on CPU (the whole
            process, weights included), ``torch.cuda.max_memory_allocated`` on GPU; ``None`` if off.
        memory_source: ``"measured"`` or ``None``.
        energy_j: Energy of one call, joules, or ``None`` when energy is off.
        energy_source: ``"measured"`` (NVML, RAPL) or ``"estimated"``, or ``None``.
        source: Source of the latency figures: always ``"measured"``.
        device: Hardware tag (see :func:`device_tag`).
        noisy: ``latency_cv > cv_bound``: re-measure before trusting it.
        samples_s: The timed latencies, in call order.
        warmup: Untimed calls before the timed ones.
        cv_bound: The bound ``noisy`` was judged against.
        memory_kind: What ``peak_memory_bytes`` is: ``"peak_rss"`` (reset per measurement),
            ``"peak_rss_sampled"`` (max of RSS before/after), ``"cuda_max_allocated"``.
        memory_delta_bytes: Peak minus the level just before the timed calls (what the call added).
        energy_meter: Name of the energy counter used.
        energy_window_s: Length of the energy window.
        energy_calls: Calls run inside the energy window (energy_j is the window's energy / this).
        attempts: Measurements made by :meth:`Meter.measure_stable` to get this one.
    """

    latency_p50_s: float
    latency_p95_s: float
    latency_mean_s: float
    latency_cv: float
    repeats: int
    tokens: int
    throughput_tok_s: float
    peak_memory_bytes: int | None
    memory_source: str | None
    energy_j: float | None
    energy_source: str | None
    source: str
    device: str
    noisy: bool
    samples_s: tuple[float, ...] = ()
    warmup: int = 0
    cv_bound: float = 0.1
    memory_kind: str | None = None
    memory_delta_bytes: int | None = None
    energy_meter: str | None = None
    energy_window_s: float | None = None
    energy_calls: int = 0
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-ready)."""
        d = asdict(self)
        d["samples_s"] = list(self.samples_s)
        return d


def latency_stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, p95, mean and CV of latency samples (the meter's estimator).

    Raises:
        ValueError: No samples, or a negative or non-finite sample.
    """
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("latency_stats needs at least one sample")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"latency samples must be finite and non-negative, got {a.tolist()}")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "p50": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "mean": mean,
        "cv": std / mean if mean > 0 else 0.0,
    }


def _check_same(items: Sequence[Any], attrs: Sequence[str], what: str) -> None:
    for attr in attrs:
        values = sorted({str(getattr(m, attr)) for m in items})
        if len(values) > 1:
            raise MixedSourceError(
                f"cannot combine {what} with different {attr}: {values}. Figures of different sources or "
                "devices are not comparable; keep them apart, or re-measure them all the same way."
            )


def combine(measurements: Sequence[Measurement]) -> Measurement:
    """Pool several measurements of the same workload (latency samples concatenated).

    Energy per call is the window-call-weighted mean; peak memory the maximum.

    Raises:
        MixedSourceError: Their sources (latency, memory, energy), devices or token counts differ.
        ValueError: Empty input.
    """
    if not measurements:
        raise ValueError("combine needs at least one Measurement")
    _check_same(measurements, ("source", "energy_source", "memory_source", "device", "tokens"), "measurements")
    first = measurements[0]
    samples = tuple(s for m in measurements for s in m.samples_s)
    st = latency_stats(samples)
    energy = None
    calls = sum(m.energy_calls for m in measurements)
    if first.energy_source is not None:
        energy = sum(m.energy_j * m.energy_calls for m in measurements) / calls  # type: ignore[operator]
    peaks = [m.peak_memory_bytes for m in measurements if m.peak_memory_bytes is not None]
    deltas = [m.memory_delta_bytes for m in measurements if m.memory_delta_bytes is not None]
    return replace(
        first,
        latency_p50_s=st["p50"],
        latency_p95_s=st["p95"],
        latency_mean_s=st["mean"],
        latency_cv=st["cv"],
        repeats=len(samples),
        throughput_tok_s=first.tokens / st["p50"] if first.tokens and st["p50"] > 0 else 0.0,
        peak_memory_bytes=max(peaks) if peaks else None,
        memory_delta_bytes=max(deltas) if deltas else None,
        energy_j=energy,
        energy_calls=calls,
        energy_window_s=sum(m.energy_window_s or 0.0 for m in measurements) or None,
        noisy=st["cv"] > first.cv_bound,
        samples_s=samples,
        attempts=sum(m.attempts for m in measurements),
    )


# ---------------------------------------------------------------------------------------- shared machine
def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores_elsewhere(interval_s: float = 0.5) -> float:
    """How many of this process's cores other processes kept busy over the next ``interval_s`` seconds.

    The machine's busy CPU time minus this process's own, over the interval, in cores. A
    measurement harness calls it before timing, while it is itself idle, to see whether its
    forward's threads will have a core each.
    """
    import psutil

    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive seconds, got {interval_s}")
    me = psutil.Process()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is already in user

    def busy() -> tuple[float, float]:
        t, own = psutil.cpu_times(), me.cpu_times()
        return sum(getattr(t, f, 0.0) for f in fields), own.user + own.system

    all0, own0 = busy()
    t0 = time.perf_counter()
    time.sleep(interval_s)
    all1, own1 = busy()
    dt = time.perf_counter() - t0
    total = psutil.cpu_count() or 1
    ours = usable_cores()
    others = max(0.0, (all1 - all0) - (own1 - own0)) / dt
    return float(min(others * ours / total, ours))  # spread evenly over the machine's cores


# ---------------------------------------------------------------------------------------- meter
class Meter:
    """Measures latency (p50/p95), throughput, peak memory and energy of a callable.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where the workload runs.
        warmup: Untimed calls before timing.
        repeats: Timed calls; p50/p95/CV are over these.
        cv_bound: Latency CV above which a measurement is flagged ``noisy``.
        energy: ``"auto"`` (NVML on CUDA, RAPL on CPU when readable, else an estimate), ``"nvml"``,
            ``"rapl"``, ``"estimate"`` or ``"off"``.
        cpu_power_w: Watts per busy core for the CPU-time estimate.
        clock: Seconds clock (default ``time.perf_counter``). An injected clock is also used for
            latency on CUDA instead of CUDA events (tests).
        gpu_power_w: Board watts for the wall-time estimate on a GPU without NVML.
        energy_window_s: Minimum energy window; the workload repeats until the window is this long.
        memory: Record peak memory.
        energy_reader: An explicit :class:`EnergyReader` (overrides ``energy``); tests pass fakes.
        nvml: NVML module for ``energy="nvml"``/``"auto"`` (default ``pynvml``); tests pass fakes.
        rapl_root: powercap folder for RAPL (tests pass a temporary folder).
        cpu_time: CPU-seconds clock for the estimate (default ``time.process_time``).
        threads: PyTorch intra-op threads for the measured calls only (restored after each
            measurement); ``None`` leaves the process setting. Timing with fewer threads than free
            cores keeps a measurement from depending on whatever else runs on the machine: a
            forward whose threads outnumber the free cores waits on descheduled threads at every
            parallel region, so its latency follows its op count instead of its work.

    Raises:
        MeterUnavailableError: An explicitly requested counter or device is not available.
        ValueError: A bad setting; the message names it.
    """

    def __init__(
        self,
        device: str = "cpu",
        warmup: int = 2,
        repeats: int = 5,
        cv_bound: float = 0.1,
        energy: EnergyMode = "auto",
        cpu_power_w: float = DEFAULT_CPU_POWER_W,
        clock: Clock | None = None,
        *,
        gpu_power_w: float = DEFAULT_GPU_POWER_W,
        energy_window_s: float = 0.1,
        memory: bool = True,
        energy_reader: EnergyReader | None = None,
        nvml: Any = None,
        rapl_root: str | Path = "/sys/class/powercap",
        cpu_time: Clock | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not cv_bound > 0:
            raise ValueError(f"cv_bound must be positive, got {cv_bound}")
        if energy not in ("auto", "nvml", "rapl", "estimate", "off"):
            raise ValueError(f"energy must be 'auto', 'nvml', 'rapl', 'estimate' or 'off', got {energy!r}")
        if not energy_window_s > 0:
            raise ValueError(f"energy_window_s must be positive seconds, got {energy_window_s}")
        self.device = device
        self.is_cuda = device.startswith("cuda")
        self.tag = device_tag(device)
        self.warmup, self.repeats, self.cv_bound = int(warmup), int(repeats), float(cv_bound)
        self.threads = None if threads is None else int(threads)
        self.energy_window_s = float(energy_window_s)
        self.memory = memory
        self._injected_clock = clock is not None
        self.clock: Clock = clock if clock is not None else time.perf_counter
        self._use_events = self.is_cuda and not self._injected_clock
        self._hwm_resettable = (not self.is_cuda) and _reset_hwm() and _hwm_bytes() is not None
        self.energy_reader: EnergyReader | None = energy_reader
        if energy_reader is None and energy != "off":
            self.energy_reader = self._pick_energy(energy, cpu_power_w, gpu_power_w, nvml, rapl_root, cpu_time)
        if self.energy_reader is not None and self.energy_reader.source not in SOURCES:
            raise ValueError(f"energy reader source must be one of {SOURCES}, got {self.energy_reader.source!r}")

    def _pick_energy(
        self, mode: str, cpu_w: float, gpu_w: float, nvml: Any, rapl_root: str | Path, cpu_time: Clock | None
    ) -> EnergyReader:
        idx = 0
        if self.is_cuda:
            import torch

            idx = torch.device(self.device).index or 0
        if mode == "nvml" or (mode == "auto" and self.is_cuda):
            try:
                return NvmlEnergy(idx, nvml)
            except MeterUnavailableError:
                if mode == "nvml":
                    raise
        if mode == "rapl" or (mode == "auto" and not self.is_cuda):
            try:
                return RaplEnergy(rapl_root)
            except MeterUnavailableError:
                if mode == "rapl":
                    raise
        if self.is_cuda:
            return WallTimeEnergy(gpu_w, self.clock)
        return CpuTimeEnergy(cpu_w, cpu_time or time.process_time)

    # ------------------------------------------------------------------ timing
    @contextmanager
    def _threads(self) -> Iterator[None]:
        """The measured calls' thread count (``threads``), the process's own restored after."""
        if self.threads is None:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _sync(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _time_call(self, fn: Callable[[], Any]) -> float:
        if self._use_events:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = self.clock()
        fn()
        self._sync()
        return self.clock() - t0

    # ------------------------------------------------------------------ memory
    def _memory_start(self) -> int | None:
        if not self.memory:
            return None
        if self.is_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if self._hwm_resettable:
            _reset_hwm()
        return _rss_bytes()

    def _memory_end(self, before: int | None) -> tuple[int | None, str | None, int | None]:
        if before is None:
            return None, None, None
        if self.is_cuda:
            import torch

            peak = int(torch.cuda.max_memory_allocated(self.device))
            return peak, "cuda_max_allocated", peak - before
        if self._hwm_resettable:
            peak = _hwm_bytes() or _rss_bytes()
            return peak, "peak_rss", max(peak - before, 0)
        peak = max(before, _rss_bytes())
        return peak, "peak_rss_sampled", peak - before

    # ------------------------------------------------------------------ energy
    def _energy(self, fn: Callable[[], Any]) -> tuple[float, float, int]:
        """Run ``fn`` back to back until the window is >= ``energy_window_s``; energy per call."""
        reader = self.energy_reader
        assert reader is not None
        self._sync()
        e0, t0 = reader.read(), self.clock()
        n = 0
        while True:
            fn()
            n += 1
            self._sync()
            elapsed = self.clock() - t0
            if elapsed >= self.energy_window_s:
                break
        e1 = reader.read()
        return (e1 - e0) / n, elapsed, n

    # ------------------------------------------------------------------ public
    def measure(self, fn: Callable[[], Any], *, tokens: int = 0) -> Measurement:
        """Measure ``fn`` (called with no arguments; its result is discarded).

        Args:
            fn: The workload, e.g. ``lambda: slm.forward(ids, plan, logits="last")``.
            tokens: Tokens one call processes, for throughput.

        Returns:
            A :class:`Measurement`; check ``noisy`` (or use :meth:`measure_stable`).
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        with self._threads():
            for _ in range(self.warmup):
                fn()
            self._sync()
            before = self._memory_start()
            samples = tuple(self._time_call(fn) for _ in range(self.repeats))
            peak, kind, delta = self._memory_end(before)
            energy_j = window = None
            calls = 0
            if self.energy_reader is not None:
                energy_j, window, calls = self._energy(fn)
        st = latency_stats(samples)
        return Measurement(
            latency_p50_s=st["p50"],
            latency_p95_s=st["p95"],
            latency_mean_s=st["mean"],
            latency_cv=st["cv"],
            repeats=self.repeats,
            tokens=int(tokens),
            throughput_tok_s=tokens / st["p50"] if tokens and st["p50"] > 0 else 0.0,
            peak_memory_bytes=peak,
            memory_source="measured" if peak is not None else None,
            energy_j=energy_j,
            energy_source=self.energy_reader.source if self.energy_reader is not None else None,
            source="measured",
            device=self.tag,
            noisy=st["cv"] > self.cv_bound,
            samples_s=samples,
            warmup=self.warmup,
            cv_bound=self.cv_bound,
            memory_kind=kind,
            memory_delta_bytes=delta,
            energy_meter=self.energy_reader.name if self.energy_reader is not None else None,
            energy_window_s=window,
            energy_calls=calls,
        )

    def measure_stable(self, fn: Callable[[], Any], *, tokens: int = 0, max_attempts: int = 3) -> Measurement:
        """Measure, and re-measure while the result is noisy, up to ``max_attempts`` times.

        Returns the first measurement that is not noisy, else the one with the lowest CV (still
        flagged ``noisy``); ``attempts`` says how many were made.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        best: Measurement | None = None
        for attempt in range(1, max_attempts + 1):
            m = self.measure(fn, tokens=tokens)
            if best is None or m.latency_cv < best.latency_cv:
                best = m
            if not m.noisy:
                return replace(m, attempts=attempt)
        assert best is not None
        return replace(best, attempts=max_attempts)

    def describe(self) -> dict[str, Any]:
        """The meter's settings, for calibration files and logs."""
        r = self.energy_reader
        return {
            "device": self.tag,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "cv_bound": self.cv_bound,
            "timer": "cuda-events" if self._use_events else ("injected" if self._injected_clock else "perf_counter"),
            "energy_meter": None if r is None else r.name,
            "energy_source": None if r is None else r.source,
            "energy_window_s": self.energy_window_s,
            "power_w": getattr(r, "power_w", None),
            "threads": self.threads,
        }


@dataclass
class FakeClock:
    """A deterministic clock for tests and examples: time moves only when :meth:`advance` is called."""

    t: float = 0.0
    history: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        """Current fake time, seconds."""
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward (a fake workload calls this instead of working)."""
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"a clock only moves forward, got {seconds}")
        self.t += seconds
        self.history.append(seconds)


def threads_in_use() -> int:
    """PyTorch intra-op threads (what a CPU latency depends on); ``os.cpu_count()`` if torch is absent."""
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1

"""What one scenario measures: CPU seconds per process role, peak RSS, committed rows and
their publish → commit latency, the offered load."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil

from .services import broker_process, postgres_processes

Pipeline = Literal["raw", "gateway"]
Load = Literal["full", "fixed"]
ROLES = ("consumer", "rabbitmq", "postgresql", "simulator")


@dataclass(frozen=True)
class Scenario:
    pipeline: Pipeline
    nodes: int
    qos: int
    load: Load
    prefetch: int
    fixed_rate: float = 1000.0
    group: Literal["main", "sweep"] = "main"

    @property
    def rate_hz(self) -> float:
        """Per node, as the simulator takes it; 0 = as fast as the broker allows."""
        return 0.0 if self.load == "full" else self.fixed_rate / self.nodes

    @property
    def load_label(self) -> str:
        return "full rate" if self.load == "full" else f"{self.fixed_rate:,.0f}/s"

    @property
    def label(self) -> str:
        return (
            f"{self.pipeline} {self.nodes} nodes QoS {self.qos} {self.load_label} "
            f"prefetch {self.prefetch}"
        )


@dataclass
class Result:
    scenario: Scenario
    window_s: float = 0.0
    committed: int = 0
    offered_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    busy: float = 0.0  # machine CPU in use during the window, in cores
    rss_peak_mib: float | None = None
    backlog: tuple[int, int] = (0, 0)  # ready messages at window start and end
    error: str | None = None
    mean_batch: float | None = None  # gateway: messages per committed batch in the window

    @property
    def rate(self) -> float:
        return self.committed / self.window_s if self.window_s else 0.0

    def cpu_per_k(self, role: str) -> float | None:
        if not self.committed or role not in self.cpu_s:
            return None
        return self.cpu_s[role] / self.committed * 1000

    @property
    def other_cores(self) -> float:
        """Machine CPU used by anything else (the bench itself, other users of the box)."""
        return max(0.0, self.busy - sum(self.cores(role) for role in ROLES))

    def cores(self, role: str) -> float:
        return self.cpu_s.get(role, 0.0) / self.window_s if self.window_s else 0.0


@dataclass
class CpuSnapshot:
    per_role: dict[str, dict[int, float]]
    system_busy_s: float


def _cpu(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(t.user + t.system)


def cpu_snapshot(pids: Mapping[str, int]) -> CpuSnapshot:
    """CPU seconds used so far by each role: the given pids, RabbitMQ, every postgres."""
    procs: dict[str, list[psutil.Process]] = {}
    for role, pid in pids.items():
        try:
            procs[role] = [psutil.Process(pid)]
        except psutil.NoSuchProcess:
            procs[role] = []
    broker = broker_process()
    procs["rabbitmq"] = [broker] if broker else []
    procs["postgresql"] = postgres_processes()
    per_role: dict[str, dict[int, float]] = {}
    for role, plist in procs.items():
        per_role[role] = {}
        for proc in plist:
            used = _cpu(proc)
            if used is not None:
                per_role[role][proc.pid] = used
    sys_t = psutil.cpu_times()
    busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
    return CpuSnapshot(per_role, busy)


def cpu_delta(start: CpuSnapshot, end: CpuSnapshot) -> tuple[dict[str, float], float]:
    """Per role: CPU used between the snapshots (a process born in between counts whole)."""
    out: dict[str, float] = {}
    for role, now in end.per_role.items():
        before = start.per_role.get(role, {})
        out[role] = sum(max(0.0, used - before.get(pid, 0.0)) for pid, used in now.items())
    return out, end.system_busy_s - start.system_busy_s


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the process's resident-set high-water mark since it started."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def interpolate(points: Sequence[tuple[float, int]], at: float) -> float | None:
    """Linear interpolation of a monotonic (time, count) series; None outside it."""
    if len(points) < 2 or not points[0][0] <= at <= points[-1][0]:
        return None
    times = [t for t, _ in points]
    i = max(1, bisect.bisect_left(times, at))
    (t0, c0), (t1, c1) = points[i - 1], points[i]
    return c0 + (c1 - c0) * ((at - t0) / (t1 - t0) if t1 > t0 else 1.0)


WINDOW_QUERY = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lat) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lat) AS p99
FROM (SELECT extract(epoch FROM stored_at) - ts AS lat
      FROM sensor_data
      WHERE stored_at >= to_timestamp($1) AND stored_at < to_timestamp($2)
        AND ts IS NOT NULL) AS w
"""


def window_figures(row: Any) -> tuple[int, float | None, float | None]:
    def ms(value: Any) -> float | None:
        return None if value is None else float(value) * 1000

    return int(row["n"]), ms(row["p50"]), ms(row["p99"])

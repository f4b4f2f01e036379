"""The markdown report: machine, command, one table per question, targets met or not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .measure import ROLES, Result

if TYPE_CHECKING:
    from .ingest import Options

TARGET_RATE = 0.90  # gateway committed/s >= 90 % of the raw consumer's
TARGET_CPU = 1.25  # gateway CPU per reading <= 1.25x the raw consumer's
TARGET_P50_MS = 10.0  # at the fixed load, gateway p50 within 10 ms of raw


def n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(
    opts: Options, info: dict[str, str], date: str, results: Sequence[Result], took_s: float
) -> str:
    main = [r for r in results if r.scenario.group == "main"]
    sweep = [r for r in results if r.scenario.group == "sweep"]
    lines = [
        f"## Ingest benchmark, {date}",
        "",
        f"- command: `{opts.command}`" + (" (`--quick`: smoke run)" if opts.quick else ""),
        f"- machine: {info['cores']} cores ({info['cpu']}), {info['ram']} RAM, "
        f"Linux {info['kernel']}",
        f"- gateway revision: {info['revision']}",
        f"- RabbitMQ {info['rabbitmq']}, PostgreSQL {info['postgresql']}, Python {info['python']}",
        f"- each scenario: fresh vhost + database, {opts.warmup_s:g} s warm-up, "
        f"{opts.window_s:g} s measurement window; fixed load = {opts.fixed_rate:,.0f} "
        f"readings/s in total; PREFETCH_COUNT {opts.prefetch} (gateway and raw consumer) "
        "unless swept",
        f"- total time {took_s / 60:.1f} min",
        *([f"- extra gateway settings: {', '.join(opts.gateway_env)}"] if opts.gateway_env else []),
        "",
    ]
    if main:
        lines += ["### Throughput, latency, CPU", "", *table(main), ""]
        lines += ["### Gateway against the raw consumer (same run)", "", *targets(main), ""]
    if sweep:
        at = sweep[0].scenario
        lines += [
            f"### PREFETCH_COUNT sweep (gateway, {at.nodes} nodes, QoS {at.qos}, full rate)",
            "",
            *sweep_table(sweep),
            "",
        ]
    errors = [r for r in results if r.error]
    if errors:
        lines += ["### Failed scenarios", ""]
        lines += [f"- {r.scenario.label}: {r.error}" for r in errors]
        lines.append("")
    return "\n".join(lines)


def table(results: Sequence[Result]) -> list[str]:
    out = [
        "| nodes | QoS | load | pipeline | published/s | committed/s | p50 ms | p99 ms "
        "| CPU s/1k: consumer | RabbitMQ | PostgreSQL | simulator | machine busy (cores) "
        "| busiest (cores) | other (cores) | consumer peak RSS MiB | gateway mean batch "
        "| backlog start → end |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        s = r.scenario
        if r.error:
            out.append(
                f"| {s.nodes} | {s.qos} | {s.load_label} | {s.pipeline} | FAILED: {r.error} |"
            )
            continue
        busiest = max(ROLES, key=r.cores)
        out.append(
            f"| {s.nodes:,} | {s.qos} | {s.load_label} | {s.pipeline} | {n(r.offered_per_s, 0)} "
            f"| {n(r.rate, 0)} | {n(r.p50_ms)} | {n(r.p99_ms)} | "
            + " | ".join(n(r.cpu_per_k(role), 3) for role in ROLES)
            + f" | {r.busy:.2f} | {busiest} {r.cores(busiest):.2f} | {r.other_cores:.2f} "
            f"| {n(r.rss_peak_mib, 0)} | {n(r.mean_batch)} "
            f"| {r.backlog[0]:,} → {r.backlog[1]:,} |"
        )
    return out


def _pair(
    results: Sequence[Result], nodes: int, qos: int, load: str
) -> tuple[Result, Result] | None:
    found = {
        r.scenario.pipeline: r
        for r in results
        if (r.scenario.nodes, r.scenario.qos, r.scenario.load) == (nodes, qos, load) and not r.error
    }
    if "raw" in found and "gateway" in found:
        return found["raw"], found["gateway"]
    return None


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def targets(results: Sequence[Result]) -> list[str]:
    out = [
        f"| nodes | QoS | committed/s gateway ÷ raw, full rate (target ≥ {TARGET_RATE:.2f}) "
        f"| gateway CPU per reading ÷ raw, full rate (target ≤ {TARGET_CPU:.2f}) "
        f"| p50 gateway minus raw at the fixed load, ms (target ≤ {TARGET_P50_MS:g}) |",
        "|---:|---:|---|---|---|",
    ]
    keys = sorted({(r.scenario.nodes, r.scenario.qos) for r in results})
    for nodes, qos in keys:
        cells = []
        full = _pair(results, nodes, qos, "full")
        if full:
            raw, gw = full
            ratio = gw.rate / raw.rate if raw.rate else 0.0
            cells.append(
                f"{ratio:.2f} ({gw.rate:,.0f} / {raw.rate:,.0f}): {verdict(ratio >= TARGET_RATE)}"
            )
            gw_cpu, raw_cpu = gw.cpu_per_k("consumer"), raw.cpu_per_k("consumer")
            if gw_cpu is not None and raw_cpu:
                c = gw_cpu / raw_cpu
                cells.append(
                    f"{c:.2f} ({gw_cpu:.3f} / {raw_cpu:.3f} s per 1k): {verdict(c <= TARGET_CPU)}"
                )
            else:
                cells.append("-")
        else:
            cells += ["-", "-"]
        fixed = _pair(results, nodes, qos, "fixed")
        if fixed and fixed[0].p50_ms is not None and fixed[1].p50_ms is not None:
            d = fixed[1].p50_ms - fixed[0].p50_ms
            cells.append(
                f"{d:+.1f} ({fixed[1].p50_ms:.1f} vs {fixed[0].p50_ms:.1f}): "
                f"{verdict(d <= TARGET_P50_MS)}"
            )
        else:
            cells.append("-")
        out.append(f"| {nodes:,} | {qos} | " + " | ".join(cells) + " |")
    return out


def sweep_table(results: Sequence[Result]) -> list[str]:
    out = [
        "| PREFETCH_COUNT | committed/s | p50 ms | p99 ms | gateway CPU s/1k | RabbitMQ s/1k "
        "| PostgreSQL s/1k | busiest (cores) | gateway peak RSS MiB | mean batch "
        "| backlog start → end |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            out.append(f"| {r.scenario.prefetch} | FAILED: {r.error} |")
            continue
        busiest = max(ROLES, key=r.cores)
        out.append(
            f"| {r.scenario.prefetch:,} | {n(r.rate, 0)} | {n(r.p50_ms)} | {n(r.p99_ms)} "
            f"| {n(r.cpu_per_k('consumer'), 3)} | {n(r.cpu_per_k('rabbitmq'), 3)} "
            f"| {n(r.cpu_per_k('postgresql'), 3)} | {busiest} {r.cores(busiest):.2f} "
            f"| {n(r.rss_peak_mib, 0)} | {n(r.mean_batch)} "
            f"| {r.backlog[0]:,} → {r.backlog[1]:,} |"
        )
    return out

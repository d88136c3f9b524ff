"""Figures in, ``docs/benchmarks.md`` and its PNG charts out.

Every figure is the median over runs; every table shows it as a ratio to
direct (the limit) and to ``ssh -R`` as well.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIRECT = "direct"
SSH = "ssh"


@dataclass
class Results:
    """Every value measured, by metric and setup, and what went wrong."""

    labels: dict[str, str] = field(default_factory=dict)
    """Setup key -> label, in the order the setups are shown."""
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, metric: str, setup: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(metric, {}).setdefault(setup, []).append(value)

    def median(self, metric: str, setup: str) -> float | None:
        runs = self.values.get(metric, {}).get(setup)
        return statistics.median(runs) if runs else None

    def runs(self, metric: str, setup: str) -> int:
        return len(self.values.get(metric, {}).get(setup, []))

    def ratio(self, metric: str, setup: str, reference: str) -> float | None:
        value, ref = self.median(metric, setup), self.median(metric, reference)
        if value is None or not ref:
            return None
        return value / ref


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@dataclass(frozen=True)
class Column:
    metric: str
    title: str
    ratios: bool = True


def metric_table(
    results: Results, caption: str, columns: Sequence[Column], setups: Sequence[str] | None = None
) -> dict[str, Any]:
    """Rows are setups; each metric gets its median, then xdirect and xssh -R."""
    head = ["setup"]
    for col in columns:
        head.append(col.title)
        if col.ratios:
            head += [
                f"{col.title.split(' (')[0]} vs direct",
                f"{col.title.split(' (')[0]} vs ssh -R",
            ]
    rows = []
    for setup in setups or results.labels:
        if not any(results.median(col.metric, setup) is not None for col in columns):
            continue
        row = [results.labels.get(setup, setup)]
        for col in columns:
            row.append(number(results.median(col.metric, setup)))
            if col.ratios:
                row += [
                    ratio(results.ratio(col.metric, setup, DIRECT)),
                    ratio(results.ratio(col.metric, setup, SSH)),
                ]
        rows.append(row)
    return {"caption": caption, "columns": head, "rows": rows}


def markdown_table(table: dict[str, Any], *, numbers: bool = True) -> str:
    """A table as JSON has it (caption, columns, rows); ``numbers`` right-aligns columns 2-."""
    columns = [str(c) for c in table.get("columns", [])]
    lines = []
    if table.get("caption"):
        lines += [f"**{table['caption']}**", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append(
        "|" + "|".join("---" if i == 0 or not numbers else "--:" for i in range(len(columns))) + "|"
    )
    for row in table.get("rows", []):
        cells = [number(c) if isinstance(c, float) else str(c) for c in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------------


def _bars(
    ax: Any,
    results: Results,
    groups: Sequence[tuple[str, str]],
    setups: Sequence[str],
    ylabel: str,
    *,
    log: bool = False,
) -> None:
    width = 0.8 / max(1, len(setups))
    drawn = False
    for i, setup in enumerate(setups):
        xs, ys = [], []
        for g, (metric, _) in enumerate(groups):
            value = results.median(metric, setup)
            if value is not None:
                xs.append(g + (i - (len(setups) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=results.labels.get(setup, setup))
        drawn = drawn or any(y > 0 for y in ys)
    ax.set_xticks(range(len(groups)), [title for _, title in groups])
    ax.set_ylabel(ylabel)
    if log and drawn:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def charts(results: Results, out: Path, title_note: str) -> dict[str, str]:
    """Write the PNG charts; return {file name: alt text}. Empty if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.problems.append(
            "charts not drawn: matplotlib is missing (pip install -e '.[bench]')"
        )
        return {}
    setups = list(results.labels)
    written: dict[str, str] = {}

    def save(fig: Any, name: str, alt: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written[name] = alt

    fig, ax = plt.subplots(figsize=(10, 5))
    _bars(
        ax,
        results,
        [
            ("iperf1", "iperf3\n1 stream"),
            ("iperf8", "iperf3\n8 streams"),
            ("dl1", "HTTP(S) download\n1 stream"),
            ("dl8", "HTTP(S) download\n8 streams"),
        ],
        setups,
        "Gbit/s (higher is better)",
    )
    ax.set_title(f"Bulk throughput {title_note}")
    ax.legend(fontsize=8)
    save(fig, "bench-throughput.png", "Bulk throughput by setup")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, rate in zip(axes, (1000, 5000), strict=True):
        _bars(
            ax,
            results,
            [(f"lat{rate}.p50", "p50"), (f"lat{rate}.p99", "p99"), (f"lat{rate}.p999", "p99.9")],
            setups,
            "ms (lower is better)",
            log=True,
        )
        ax.set_title(f"Request latency at {rate:,} req/s, kept-alive")
    axes[0].legend(fontsize=8)
    save(fig, "bench-latency.png", "Request latency percentiles by setup")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    _bars(axes[0], results, [("rate64", "64 connections")], setups, "requests/s (higher is better)")
    axes[0].set_title("Highest request rate")
    _bars(
        axes[1],
        results,
        [("ttfb.p50", "p50"), ("ttfb.p99", "p99")],
        setups,
        "ms (lower is better)",
    )
    axes[1].set_title("Time to first byte, fresh TLS connection")
    axes[0].legend(fontsize=8)
    save(fig, "bench-requests.png", "Request rate and fresh-connection latency by setup")
    return written

"""Plot failover time per round, celery-stoker beside RedBeat, from ``failover.json``.

matplotlib is an optional bench dependency (``pip install -e '.[bench]'``);
:func:`plot` returns None with a reason when it is missing, so the benchmarks
themselves never need it.

    python -m bench.plot bench/results/full/failover.json bench/results/full/failover.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KINDS = (
    ("sigterm", "clean stop (SIGTERM)"),
    ("sigkill", "crash (SIGKILL)"),
    ("partition", "network partition"),
)


def plot(results: Path, out: Path, title: str = "") -> str | None:
    """Write the PNG; return None on success, else why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    data: dict[str, Any] = json.loads(results.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), sharey=True)
    for ax, (kind, label) in zip(axes, KINDS, strict=True):
        series: list[tuple[str, str, str, list[dict[str, Any]] | None]] = []
        for run in data.get("stoker", []):
            rounds = run["kinds"].get(kind, {}).get("rounds")
            series.append(
                (
                    f"celery-stoker, TTL {run['ttl']:g} s",
                    "o",
                    "tab:blue" if run["ttl"] < 5 else "tab:green",
                    rounds,
                )
            )
        for run in data.get("redbeat", []):
            if run["kind"] == kind:
                colour = "tab:orange" if run["config"] != "defaults" else "tab:red"
                series.append((f"RedBeat {run['config']}", "s", colour, run["rounds"]))
        for name, marker, colour, rounds in series:
            if not rounds:
                continue
            xs = [r["round"] for r in rounds]
            ys = [r["seconds"] for r in rounds]
            capped = [bool(r.get("capped")) for r in rounds]
            if not all(capped):
                ax.plot(
                    [x for x, c in zip(xs, capped, strict=True) if not c],
                    [y for y, c in zip(ys, capped, strict=True) if not c],
                    marker=marker,
                    linestyle="-",
                    linewidth=0.8,
                    markersize=5,
                    color=colour,
                    label=name,
                )
            if any(capped):
                ax.plot(
                    [x for x, c in zip(xs, capped, strict=True) if c],
                    [y for y, c in zip(ys, capped, strict=True) if c],
                    marker="^",
                    linestyle="none",
                    markersize=9,
                    markerfacecolor="none",
                    color=colour,
                    label=f"{name}: capped (at least)",
                )
        if kind == "sigterm":
            ax.axhline(0.050, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                "target p95 50 ms",
                (0.02, 0.050),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                color="grey",
                va="bottom",
            )
        else:
            for run in data.get("stoker", []):
                bound = run["ttl"] + run["renew_interval"]
                ax.axhline(bound, color="grey", linestyle=":", linewidth=1)
                ax.annotate(
                    f"TTL + renew = {bound:.2f} s",
                    (0.02, bound),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color="grey",
                    va="bottom",
                )
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fault -> new leader acts (seconds, log scale)")
    # One legend for all three panels, below them, so no point hides behind it.
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(6, len(handles)),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title or "Failover time per round: celery-stoker vs RedBeat (one run)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} failover.json out.png")
    problem = plot(Path(sys.argv[1]), Path(sys.argv[2]))
    if problem:
        raise SystemExit(problem)


if __name__ == "__main__":
    main()

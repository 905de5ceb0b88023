"""Run every benchmark in one go, print every table, write JSON, Markdown and the plot.

    python -m bench.run_all --quick     # about ten minutes; fewer rounds, RedBeat capped
    python -m bench.run_all --full      # every round (about an hour: RedBeat's defaults)
    python -m bench.run_all --smoke     # a minute: only checks that everything runs

Results go to ``bench/results/<mode>/`` (``--out`` to change): one JSON per
benchmark with the machine it ran on, ``tables.md`` / ``tables.txt`` with
every table, and ``failover.png`` when matplotlib is installed.  Every
benchmark starts its own ``redis-server`` on a free port and its own processes,
and stops them again -- also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    balance,
    dispatch,
    failover,
    fleet,
    footprint,
    handover,
    idle,
    pools,
    recovery,
    scale,
    state_bytes,
    store_failover,
)
from bench.common import (
    ROOT,
    RunDir,
    Table,
    cleanup_all,
    install_signal_handlers,
    machine_info,
    print_table,
    write_json,
)
from bench.plot import plot

Runner = Callable[[str], tuple[dict[str, Any], list[Table]]]
#: In this order: failover first, while the machine is freshest for the ms figures.
BENCHES: dict[str, Runner] = {
    "failover": failover.run,
    "store_failover": store_failover.run,
    "handover": handover.run,
    "dispatch": dispatch.run,
    "recovery": recovery.run,
    "idle": idle.run,
    "footprint": footprint.run,
    "scale": scale.run,
    "state_bytes": state_bytes.run,
    "pools": pools.run,
    "fleet": fleet.run,
    "balance": balance.run,
}
#: Benchmarks too slow for the smoke run (which CI runs), and why.
SKIPPED_IN_SMOKE = {
    "store_failover": "half a minute at one round: a six-node cluster, three workers per store; "
    "run it with python -m bench.store_failover --mode smoke",
    "state_bytes": "a quarter of a minute at one round (states of 1 KB and 1 MB); run it "
    "with python -m bench.state_bytes --mode smoke",
    "pools": "two minutes even in smoke (20 s windows, recycled pools, handovers); run it "
    "with python -m bench.pools --mode smoke",
    "fleet": "half a minute at its smallest (two leader runs, a fresh Redis each waits out a "
    "TTL); run it with python -m bench.fleet --mode smoke",
    "balance": "two minutes at its smallest (two fleets from cold, each waits out a TTL, a "
    "join and a crash); run it with python -m bench.balance --mode smoke",
}

RENDERERS: dict[str, Callable[[dict[str, Any]], list[Table]]] = {
    "failover": failover.render,
    "store_failover": store_failover.render,
    "handover": handover.render,
    "dispatch": dispatch.render,
    "recovery": recovery.render,
    "idle": idle.render,
    "footprint": footprint.render,
    "scale": scale.render,
    "state_bytes": state_bytes.render,
    "pools": pools.render,
    "fleet": fleet.render,
    "balance": balance.render,
}


def write_tables(out: Path) -> None:
    """``tables.md`` and ``tables.txt`` from every benchmark's JSON in ``out``.

    Built from the saved results rather than from this invocation, so that a
    rerun of one benchmark (``--only``) replaces its tables and keeps the others.
    """
    markdown, text = [], []
    for name, render in RENDERERS.items():
        path = out / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        line = (
            f"{name}: {data.get('mode')} mode, {data.get('elapsed_s', 0):.0f} s; "
            f"{machine_line(data['machine'])}"
        )
        tables = render(data)
        markdown.append(f"_{line}_\n\n" + "\n\n".join(t.markdown() for t in tables))
        text.append(f"[{line}]\n\n" + "\n\n".join(t.text() for t in tables))
    (out / "tables.md").write_text("\n\n".join(markdown) + "\n")
    (out / "tables.txt").write_text("\n\n".join(text) + "\n")


def draw(out: Path, mode: str) -> str | None:
    """The failover plot from ``out/failover.json``; None when drawn, else why not."""
    path = out / "failover.json"
    if not path.exists():
        return f"no {path}"
    machine = json.loads(path.read_text())["machine"]
    return plot(
        path,
        out / "failover.png",
        f"Failover per round, celery-stoker vs RedBeat ({mode} run, {machine['date_utc']}, "
        f"{machine['nproc']} CPUs {machine['cpu_model']})",
    )


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date_utc']}; {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
        f"{m['os']}; Python {m['python']}; {m['redis_server'].split(' sha=')[0]}; "
        f"celery {m['celery']}, redis-py {m['redis_py']}, celery-redbeat "
        f"{m['celery_redbeat']}; commit {m['git_commit']}"
        f"{' + uncommitted package changes' if m.get('package_dirty') else ''}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    for mode in ("smoke", "quick", "full"):
        group.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results/<mode>)"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=None)
    parser.add_argument("--keep-logs", action="store_true", help="keep worker and beat logs")
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rebuild tables.md, tables.txt and the plot from saved JSON",
    )
    args = parser.parse_args()
    mode = args.mode or "quick"
    out: Path = args.out or ROOT / "bench" / "results" / mode
    RunDir.keep = args.keep_logs
    if args.render:
        write_tables(out)
        print((out / "tables.txt").read_text())
        print(f"plot: {draw(out, mode) or out / 'failover.png'}")
        return 0
    install_signal_handlers()

    started = time.monotonic()
    machine = machine_info()
    print(f"celery-stoker benchmarks, {mode} mode -> {out}")
    print(f"machine: {machine_line(machine)}", flush=True)
    write_json(out / "machine.json", machine)
    failed: list[str] = []
    try:
        for name, runner in BENCHES.items():
            if args.only and name not in args.only:
                continue
            if mode == "smoke" and name in SKIPPED_IN_SMOKE:
                print(f"\n== {name}: not in smoke mode ({SKIPPED_IN_SMOKE[name]})", flush=True)
                continue
            t0 = time.monotonic()
            print(f"\n== {name}", flush=True)
            try:
                data, tables = runner(mode)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            elapsed = time.monotonic() - t0
            write_json(
                out / f"{name}.json",
                {"mode": mode, "elapsed_s": elapsed, "machine": machine, **data},
            )
            for table in tables:
                print_table(table)
            print(f"\n   ({name}: {elapsed:.0f} s)", flush=True)
    finally:
        cleanup_all()

    write_tables(out)
    if not args.only or "failover" in args.only:
        print(f"\nplot: {draw(out, mode) or out / 'failover.png'}")
    total = time.monotonic() - started
    print(f"\nall done in {total:.0f} s ({total / 60:.1f} min); tables in {out / 'tables.md'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

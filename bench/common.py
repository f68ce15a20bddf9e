"""What the benchmark scripts share: scratch databases on a PostgreSQL server, `pgbench` as the
machine's own limit, the machine's description, and the rows they append to
docs/benchmarks.md. A benchmark prints figures; it asserts nothing about time."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
PGBENCH_DB = "poolsadmin_pgbench"
HOST = "127.0.0.1"


def standard_arguments(parser: argparse.ArgumentParser, *, source: str) -> None:
    """The arguments the benchmarks that start processes share: the PostgreSQL server to
    build on, the checkout under test (`source`: what it runs from it), a label, --smoke and
    --no-record."""
    parser.add_argument("--admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--source", type=Path, default=ROOT, help=source)
    parser.add_argument("--label", default="", help="what is measured, for the output")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run, no record")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")


def url_for(admin_url: str, database: str) -> str:
    return urllib.parse.urlsplit(admin_url)._replace(path=f"/{database}").geturl()


def drop(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def recreate(admin_url: str, database: str, *, template: str = "") -> None:
    drop(admin_url, database)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}" + (f" TEMPLATE {template}" if template else ""))


def server_facts(admin_url: str) -> tuple[str, int]:
    with psycopg.connect(admin_url) as admin:
        version = admin.execute("SHOW server_version").fetchone()
        limit = admin.execute("SHOW max_connections").fetchone()
    assert version is not None and limit is not None
    return str(version[0]), int(limit[0])


def pg_args(admin_url: str) -> list[str]:
    parts = urllib.parse.urlsplit(admin_url)
    args = ["-h", parts.hostname or HOST, "-p", str(parts.port or 5432)]
    return [*args, "-U", parts.username] if parts.username else args


def pgbench_init(admin_url: str, *, scale: int = 10) -> None:
    recreate(admin_url, PGBENCH_DB)
    subprocess.run(
        ["pgbench", *pg_args(admin_url), "-i", "-q", "-s", str(scale), PGBENCH_DB],
        capture_output=True,
        check=True,
    )


def pgbench(admin_url: str, *, clients: int = 8, seconds: int = 15) -> float:
    """tps of `pgbench -N` (no updates of the small tables, so no lock contention: one small
    transaction per operation, what the server does with this many clients on this machine).
    Needs `pgbench_init` first."""
    done = subprocess.run(
        [
            "pgbench",
            *pg_args(admin_url),
            "-N",
            "-T",
            str(seconds),
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            PGBENCH_DB,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB RAM"


def now_stamp() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"


RESULT_HEADER = (
    "| date | machine | command | figure | value | goal | met |\n|---|---|---|---|---|---|---|\n"
)


def append_results(
    title: str, rows: Sequence[tuple[str, str, str, bool | None]], command: str
) -> None:
    """Append one row per figure (figure, value, goal, met) under `## Results: <title>` at the
    end of docs/benchmarks.md; the heading and table header are written the first time."""
    heading = f"## Results: {title}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + RESULT_HEADER
    section_start = text.index(heading)
    next_section = text.find("\n## ", section_start + len(heading))
    block_end = len(text) if next_section == -1 else next_section
    stamp, where = now_stamp(), machine() + f", load {os.getloadavg()[0]:.1f}"
    new_rows = "".join(
        f"| {stamp} | {where} | `{command}` | {figure} | {value} | {goal} | "
        f"{'—' if met is None else ('yes' if met else 'no')} |\n"
        for figure, value, goal, met in rows
    )
    block = text[section_start:block_end].rstrip("\n") + "\n" + new_rows
    rest = text[block_end:].lstrip("\n")
    BENCHMARKS_MD.write_text(text[:section_start] + block + ("\n" + rest if rest else ""))

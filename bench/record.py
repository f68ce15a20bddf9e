"""What every benchmark prints about the machine, and the rows it appends to docs/benchmarks.md.

A row per figure: date, machine (and its load, since the machines are shared), command,
figure, goal, met. The rows go under the table heading of docs/benchmarks.md named by
`section`, created at the end of the file the first time.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
TABLE_HEAD = "| date | machine | command | figure | goal | met |\n|---|---|---|---|---|---|\n"


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


@dataclass(frozen=True)
class Row:
    figure: str  # "pool page, 1,000 pods x 4 slots: 120 ms"
    goal: str  # "< 300 ms"
    met: bool


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def record(section: str, rows: list[Row], *, path: Path = BENCHMARKS) -> None:
    """Append `rows` to the table under `## {section}`; the section (with its table head)
    is added at the end of the file if it is not there yet."""
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    where = f"{machine()}, load {os.getloadavg()[0]:.1f}"
    lines = "".join(
        f"| {stamp} | {where} | `{command_line()}` | {row.figure} | {row.goal} | "
        f"{'yes' if row.met else 'no'} |\n"
        for row in rows
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = f"## {section}\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n{TABLE_HEAD}"
    start = text.index(heading)
    # The section's table ends at the first line after it that is not a table row.
    table_at = text.index(TABLE_HEAD, start) + len(TABLE_HEAD)
    end = table_at
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    path.write_text(text[:end] + lines + text[end:])

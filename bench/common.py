"""What the benchmark scripts share: scratch databases on a PostgreSQL server, `pgbench` as the
machine's own limit, the machine's description, and the rows they append to
docs/benchmarks.md. A benchmark prints figures; it asserts nothing about time."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
PGBENCH_DB = "poolsadmin_pgbench"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


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


# --- processes under test ---------------------------------------------------------------------


def process_env(*, source: Path, database_url: str, prefix: str, debug: bool) -> dict[str, str]:
    """The environment of the processes under test: settings from `source`, a fresh
    SECRET_KEY, the in-memory channel layer, warnings only, and a new var directory (its
    POOLSADMIN_VAR_DIR, where the benches put the processes' logs)."""
    var_dir = tempfile.mkdtemp(prefix=prefix)
    return {
        **os.environ,
        "PYTHONPATH": str(source),
        "DJANGO_SETTINGS_MODULE": "poolsadmin.settings",
        "DEBUG": "true" if debug else "false",
        "SECRET_KEY": secrets.token_hex(32),
        "ALLOWED_HOSTS": HOST,
        "DATABASE_URL": database_url,
        "CHANNEL_LAYER_URL": "",
        "LOG_LEVEL": "WARNING",
        "POOLSADMIN_VAR_DIR": var_dir,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds of the whole machine so far, every core and process (PostgreSQL's too):
    (busy, total). The difference of two readings says how busy the machine was between
    them."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle, iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def manage(source: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def database_setup(source: Path, env: dict[str, str], code: str) -> dict[str, Any]:
    """Migrate the database of `env` with the code of `source`, then run `code` there
    (`manage.py shell -c`, that checkout's own services) and return the JSON object its last
    line prints."""
    manage(source, env, "migrate", "--noinput", "-v0")
    printed = manage(source, env, "shell", "--no-imports", "-c", code)
    found: dict[str, Any] = json.loads(printed.strip().splitlines()[-1])
    return found


def start_web(source: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """One web process as the image runs it (the Dockerfile's CMD: daphne --proxy-headers),
    once it answers."""
    with log.open("wb") as out:
        web = subprocess.Popen(
            [
                str(BIN / "daphne"),
                "--proxy-headers",
                "-b",
                HOST,
                "-p",
                str(port),
                "poolsadmin.asgi:application",
            ],
            cwd=source,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if web.poll() is not None:
            raise SystemExit(f"daphne exited with {web.returncode}:\n{log.read_text()}")
        # Any answer of the API is a server up: pages need collected static files with DEBUG
        # off, and the API is never redirected to HTTPS.
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/api/v1/", timeout=5):
                return web
        except urllib.error.HTTPError:
            return web
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    web.kill()
    raise SystemExit(f"daphne did not answer within 60 s:\n{log.read_text()}")


def start_worker(source: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`manage.py worker` (scheduler, reconciler, autoscaler, ...), as the worker Deployment
    runs it."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "manage.py", "worker"],
            cwd=source,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """One HTTP/1.1 response: its status, whether the connection stays open, its body."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    body = b""
    if headers.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readline()
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers.get(b"connection") != b"close", body

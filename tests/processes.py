"""For tests that start poolsadmin as real processes (daphne, `manage.py worker`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANAGE = [sys.executable, str(ROOT / "manage.py")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def collect_static(root: Path) -> None:
    """`collectstatic` into `root` as the image does at build time: with DEBUG off a page
    names its files from the manifest, and without one it cannot render (a 500)."""
    subprocess.run(
        [*MANAGE, "collectstatic", "--noinput"],
        env={**os.environ, "DEBUG": "false", "SECRET_KEY": "build", "STATIC_ROOT": str(root)},
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )

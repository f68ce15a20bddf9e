from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.agents.nudge import MAX_WAIT_SECONDS
from poolsadmin.agents.reference import (
    AgentApiError,
    AgentTransportError,
    ReferenceAgent,
    Simulation,
)

logger = logging.getLogger("poolsadmin.agent")

# The pod template sets these (kube/adapter.py pod_manifest).
TOKEN_ENV = "POOLSADMIN_AGENT_TOKEN"
POD_UID_ENV = "POOLSADMIN_POD_UID"
STATE_FILE_ENV = "POOLSADMIN_AGENT_STATE_FILE"


def ratio(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{value} is not between 0 and 1")
    return value


class Command(BaseCommand):
    help = (
        "Run the reference agent: register with a pool token, heartbeat, accept work and run "
        "it with --command or as a simulation, until SIGTERM or SIGINT."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", required=True, help="poolsadmin base URL")
        parser.add_argument(
            "--token",
            default=os.environ.get(TOKEN_ENV, ""),
            help=f"pool token apt_<pool_id>_<hex> (default ${TOKEN_ENV}, which keeps it out "
            "of the process list)",
        )
        parser.add_argument(
            "--name",
            default=socket.gethostname(),
            help="agent name; in a k8s pool the pod name, which is the default (the hostname)",
        )
        parser.add_argument("--interval", type=float, default=2.0, help="heartbeat seconds")
        parser.add_argument(
            "--long-poll",
            type=float,
            default=0.0,
            help="seconds each heartbeat asks the server to wait for work, 0-20 (0: none); "
            "work then arrives as it is dispatched, and stopping takes up to this long",
        )
        parser.add_argument(
            "--command",
            default=None,
            help="shell command per task, with TASK_ID, WORKSPACE_ID, ACTION, TASK_TYPE and "
            "REUSE_WORKDIR in its environment; exit 0 = success, 2 = plan has changes",
        )
        parser.add_argument("--duration", type=float, default=3.0, help="simulated seconds")
        parser.add_argument("--changes-ratio", type=ratio, default=0.5)
        parser.add_argument("--failure-ratio", type=ratio, default=0.0)
        parser.add_argument(
            "--pod-uid",
            default=os.environ.get(POD_UID_ENV, ""),
            help=f"the pod's uid (default ${POD_UID_ENV}): in a k8s pool, lets a new pod of "
            "an old name register under it",
        )
        parser.add_argument(
            "--state-file",
            default=os.environ.get(STATE_FILE_ENV, ""),
            help=f"where the agent keeps its identity across restarts (default "
            f"${STATE_FILE_ENV}); without it, a restarted agent cannot register again under "
            "its name until an admin retires the old identity",
        )
        parser.add_argument(
            "--once",
            action="store_true",
            help="one heartbeat, run what it assigned to the end, report, exit",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["token"]:
            raise CommandError(f"a pool token is required: --token or ${TOKEN_ENV}")
        if options["interval"] <= 0 or options["duration"] < 0:
            raise CommandError("--interval must be positive and --duration not negative")
        if not 0 <= options["long_poll"] <= MAX_WAIT_SECONDS:
            raise CommandError(f"--long-poll must be from 0 to {MAX_WAIT_SECONDS} seconds")
        agent = ReferenceAgent(
            url=options["url"],
            token=options["token"],
            name=options["name"],
            heartbeat_interval=options["interval"],
            command=options["command"],
            simulation=Simulation(
                duration_seconds=options["duration"],
                changes_ratio=options["changes_ratio"],
                failure_ratio=options["failure_ratio"],
            ),
            pod_uid=options["pod_uid"],
            state_file=Path(options["state_file"]) if options["state_file"] else None,
            long_poll=options["long_poll"],
        )
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s: stopping the agent", signum)
            stop.set()

        # Restored afterwards: the command also runs inside other processes (tests, demo).
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        mode = f"command {options['command']!r}" if options["command"] else "simulation"
        self.stdout.write(f"agent {agent.name}: {agent.url} ({mode})")
        try:
            if options["once"]:
                self._once(agent, stop)
            else:
                agent.run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write(f"agent {agent.name}: stopped")

    def _once(self, agent: ReferenceAgent, stop: threading.Event) -> None:
        try:
            agent.step()
            agent.wait_idle(stop)
        except (AgentTransportError, AgentApiError) as error:
            raise CommandError(str(error)) from None
        finally:
            agent.abandon_all()

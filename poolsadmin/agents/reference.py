"""The reference agent (SPEC 7): registers, heartbeats, accepts work and runs it, either with a
configurable command or as a simulation. The demo and the end-to-end tests use it.

It speaks the agent API over HTTP with the standard library only (and `lib/logs.py` for the
ids on its log lines), so it runs anywhere Python does and imports nothing of Django. Its log
lines carry `agent_id`, `pool_id` and, about a task, `task_id` and `pod`; no line carries the
pool token or the agent secret, and a task's command does not get the token in its
environment. Work travels in heartbeat answers:

* with `long_poll` seconds, every heartbeat asks the server to wait that long for work
  (`"wait"`, agents/nudge.py): an assignment arrives as it is dispatched, and the next
  heartbeat goes out right after the answer instead of `heartbeat_interval` later (a server
  that does not know `wait` answers at once, and the agent keeps its interval);
* an assignment is accepted, then run in its own thread;
* every heartbeat lists the tasks still held (running, or finished with the outcome not yet
  delivered), so the server's cross-check does not take them for lost;
* a cancellation stops the work (the command's process group is terminated) and the task is
  never reported;
* an outcome is reported with `PUT .../status` as soon as the work ends; a transport error,
  a 5xx or a 401 (token being rotated) keeps it for the next step; any other refusal means the
  server has decided (409: the task was cancelled or failed meanwhile) and the task is dropped;
* every call after registration carries the agent secret that registration returned
  (`X-Agent-Secret`), and so does registering again: a name that an agent holds is only
  given back to whoever proves to be that agent (or, in a k8s pool, to a new pod of that
  name: `pod_uid`). With `state_file` the identity survives a restart of the agent (a static
  agent's machine; in a k8s pool a pod never restarts its agent, restart_policy Never). The
  agent proposes its new secret when it registers, so a registration whose answer was lost is
  sent again as it was and proves itself;
* a 403 for the agent's identity (an admin retired it) makes the agent register again, once,
  and retry the call;
* when the agent stops, work in progress is abandoned unreported: the server fails it after
  its grace period, as it would for a pod that died.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

from poolsadmin.lib.logs import log_ids

logger = logging.getLogger("poolsadmin.agent")

STDERR_TAIL_CHARS = 2000
# A cancelled command gets this long to stop on SIGTERM (terraform releases its state lock)
# before its process group is killed.
KILL_AFTER_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0
# Variables holding this agent's credentials (`manage.py agent` reads the pool token from the
# first), kept out of a task command's environment.
CREDENTIAL_ENV = frozenset({"POOLSADMIN_AGENT_TOKEN", "POOLSADMIN_AGENT_STATE_FILE"})
# Pause between two long-poll heartbeats: the server's wait is the pace.
LONG_POLL_PAUSE_SECONDS = 0.05
# Exit code of `terraform plan -detailed-exitcode` when the plan has changes.
EXIT_CHANGES = 2


@dataclass
class Simulation:
    duration_seconds: float = 3.0  # per task, with +-30% jitter
    changes_ratio: float = 0.5  # plan_and_apply plan finds changes -> apply_pending
    failure_ratio: float = 0.0  # task fails


class AgentApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.field = field


class AgentTransportError(Exception):
    """The server could not be reached or gave no usable answer; worth retrying."""


@dataclass(frozen=True)
class Outcome:
    status: str
    error_message: str = ""


@dataclass
class _Job:
    task_id: int
    agent_id: str
    workspace_id: str
    task_type: str
    action: str  # plan | apply
    reuse_workdir: bool
    cancelled: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    outcome: Outcome | None = None
    reporting: bool = False


class ReferenceAgent:
    def __init__(
        self,
        *,
        url: str,
        token: str,
        name: str,
        version: str = "reference-1",
        heartbeat_interval: float = 2.0,
        command: str | None = None,
        simulation: Simulation | None = None,
        max_backoff: float = MAX_BACKOFF_SECONDS,
        pod_uid: str = "",
        state_file: Path | None = None,
        long_poll: float = 0.0,
    ) -> None:
        self.url = url.rstrip("/")
        # Seconds each heartbeat asks the server to wait for work (0: answer at once). A stop
        # waits for the heartbeat in flight, so at most this long.
        self.long_poll = long_poll
        self._server_waits = False  # the last answer said whether its wait was cut short
        # Longest wait between two attempts while the server cannot be used. Keep it well
        # under the pool's heartbeat timeout: after an outage of poolsadmin, an agent has its
        # timeout to be heard again.
        self.max_backoff = max_backoff
        self.name = name
        self.version = version
        self.heartbeat_interval = heartbeat_interval
        self.command = command
        self.simulation = simulation or Simulation()
        self.agent_id: str | None = None
        self.pool_id: str | None = None
        self.timeout = 10.0
        self._token = token
        self._secret: str | None = None
        # The secret this agent proposes at its next registration, kept until one succeeds:
        # a registration whose answer was lost is sent again as it was, and proves itself.
        self._proposed: str | None = None
        # Guards agent_id and _secret together; reentrant, as re-registering holds it.
        self._identity_lock = threading.RLock()
        self._random = random.Random()
        self._lock = threading.Lock()  # guards _jobs and every _Job's mutable fields
        self._step_lock = threading.Lock()  # one step at a time, whoever calls it
        self._jobs: dict[int, _Job] = {}
        self.pod_uid = pod_uid
        self.state_file = state_file
        self._load_identity()

    # --- public -------------------------------------------------------------------------------

    def register(self) -> None:
        """Register (or again, proving it is the same agent with the secret it holds), and
        keep the new agent secret (in `state_file` too, if there is one)."""
        with self._identity_lock:
            if self._proposed is None:
                self._proposed = f"ags_{secrets.token_hex(32)}"
            body = {"name": self.name, "version": self.version, "agent_secret": self._proposed}
            if self.pod_uid:
                body["pod_uid"] = self.pod_uid
            answer = self._call("POST", "/api/v1/agents/register", body, proof=self._secret or None)
            self.agent_id = str(answer["agent_id"])
            self.pool_id = str(answer["pool_id"])
            self._secret = str(answer["agent_secret"])
            self._proposed = None
            self._save_identity()
        logger.info(
            "registered %s as %s in pool %s",
            self.name,
            self.agent_id,
            self.pool_id,
            extra=self._ids(),
        )

    def _load_identity(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as error:
            logger.warning(
                "ignoring the agent state in %s: %s", self.state_file, error, extra=self._ids()
            )
            return
        if isinstance(state, dict) and state.get("name") == self.name:
            self.agent_id = str(state.get("agent_id") or "") or None
            self._secret = str(state.get("agent_secret") or "") or None

    def _save_identity(self) -> None:
        if self.state_file is not None and self.agent_id and self._secret:
            identity_save(
                self.state_file, name=self.name, agent_id=self.agent_id, secret=self._secret
            )

    @property
    def running_task_ids(self) -> list[int]:
        """Tasks this agent holds: running, or finished with the outcome not yet reported."""
        with self._lock:
            return sorted(self._jobs)

    def step(self) -> None:
        """1. register if needed; 2. deliver outcomes whose report failed earlier;
        3. heartbeat with the tasks still held; 4. stop cancelled work; 5. accept and start
        new assignments. Raises AgentTransportError or AgentApiError when the server cannot
        be used; the caller backs off."""
        with self._step_lock:
            if self.agent_id is None:
                self.register()
            self._report_finished()
            try:
                # The agent id is in the path: after registering again (an admin retired
                # this identity) the heartbeat goes out under the new one.
                body: dict[str, Any] = {"running_task_ids": self.running_task_ids, **_usage()}
                if self.long_poll > 0:
                    body["wait"] = self.long_poll
                answer = self._call_as_agent(
                    "POST",
                    lambda agent_id: f"/api/v1/agents/{agent_id}/heartbeat",
                    body,
                    timeout=self.timeout + self.long_poll,
                )
            except AgentApiError as error:
                if error.status in (403, 404):
                    # The server no longer knows this agent in the token's pool (database
                    # reset, token of another pool): register again on the next step.
                    logger.warning(
                        "heartbeat refused (%s); registering again", error, extra=self._ids()
                    )
                    self.agent_id = None
                raise
            self._server_waits = "woken" in answer
            agent_id = self.agent_id
            assert agent_id is not None
            for cancellation in answer.get("cancellations", []):
                self._cancel(int(cancellation["task_id"]), str(cancellation.get("reason", "")))
            for assignment in answer.get("assignments", []):
                self._start(agent_id, assignment)

    def run(self, stop: threading.Event) -> None:
        """Register, then step every `heartbeat_interval` until `stop` is set. Server errors
        and refused connections are logged and retried with exponential back-off; work in
        progress is abandoned when stopping (the server fails it after its grace period)."""
        failures = 0
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as error:
                    failures += 1
                    delay = min(self.heartbeat_interval * 2 ** min(failures, 10), self.max_backoff)
                    expected = isinstance(error, AgentTransportError | AgentApiError)
                    logger.log(
                        logging.WARNING if expected else logging.ERROR,
                        "agent %s: %s (attempt %d); retrying in %.1f s",
                        self.name,
                        error,
                        failures,
                        delay,
                        exc_info=not expected,
                        extra=self._ids(),
                    )
                    stop.wait(delay)
                    continue
                if failures:
                    logger.info("agent %s: server reachable again", self.name, extra=self._ids())
                failures = 0
                stop.wait(self._pause())
        finally:
            self.abandon_all()

    def _pause(self) -> float:
        """Seconds until the next heartbeat: at once after a long poll the server held (its
        wait paces the agent), else the interval."""
        if self.long_poll > 0 and self._server_waits:
            return min(self.heartbeat_interval, LONG_POLL_PAUSE_SECONDS)
        return self.heartbeat_interval

    def wait_idle(self, stop: threading.Event, timeout: float | None = None) -> bool:
        """Accept nothing new; wait until every started task has finished and its outcome has
        been delivered (retrying failed reports). True if nothing is held any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running_task_ids and not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            with self._step_lock:
                self._report_finished()
            stop.wait(min(self.heartbeat_interval, 0.5))
        return not self.running_task_ids

    def abandon_all(self) -> None:
        """Stop every task this agent holds without reporting it."""
        for task_id in self.running_task_ids:
            self._cancel(task_id, "agent stopping")

    # --- HTTP ---------------------------------------------------------------------------------

    def _ids(self, task_id: int | None = None, *, pod: str = "") -> dict[str, Any]:
        """The ids of this agent's log lines (`lib/logs.py`), and of the task one is about."""
        return log_ids(task=task_id, pool=self.pool_id, pod=pod, agent=self.agent_id)

    def _identity(self) -> tuple[str, str] | None:
        with self._identity_lock:
            if self.agent_id is None or self._secret is None:
                return None
            return self.agent_id, self._secret

    def _call_as_agent(
        self,
        method: str,
        path: str | Callable[[str], str],
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A call that acts as this agent (`path` may be built from its agent id). If the
        server refuses the agent's identity (an admin retired it), register again once and
        retry as whoever that registration made this agent."""
        identity = self._identity()

        def at(who: tuple[str, str] | None) -> str:
            return path if isinstance(path, str) else path(who[0] if who else "")

        try:
            return self._call(method, at(identity), body, identity=identity, timeout=timeout)
        except AgentApiError as error:
            if not _identity_refused(error):
                raise
            logger.warning("agent %s: %s; registering again", self.name, error, extra=self._ids())
        with self._identity_lock:
            # Another thread (a report, the step) may have registered again meanwhile: one
            # new secret is enough, and a second registration would void the first's.
            if self._identity() == identity:
                self.register()
            identity = self._identity()
        return self._call(method, at(identity), body, identity=identity, timeout=timeout)

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        identity: tuple[str, str] | None = None,
        proof: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"poolsadmin-reference-agent/{self.version}",
        }
        if identity is not None:
            headers["X-Agent-Id"], headers["X-Agent-Secret"] = identity
        elif proof is not None:  # registering again: the secret proves it is this agent
            headers["X-Agent-Secret"] = proof
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            payload = _json_object(error.read()) or {}
            detail = str(payload.get("detail") or error.reason)
            raise AgentApiError(error.code, detail, payload.get("field")) from None
        except (urllib.error.URLError, OSError, HTTPException) as error:
            raise AgentTransportError(f"{method} {path}: {error}") from None
        answer = _json_object(raw)
        if answer is None:
            # A proxy's error page or a truncated answer: retry like a transport error.
            raise AgentTransportError(f"{method} {path}: the answer is not a JSON object")
        return answer

    # --- work ---------------------------------------------------------------------------------

    def _start(self, agent_id: str, assignment: dict[str, Any]) -> None:
        task_id = int(assignment["task_id"])
        action = "apply" if assignment.get("action") == "apply" else "plan"
        try:
            self._call_as_agent(
                "POST", f"/api/v1/agents/tasks/{task_id}/accept", {"agent_id": agent_id}
            )
        except AgentApiError as error:
            # The dispatch was rolled back, cancelled or given to another agent meanwhile.
            logger.info("task #%s not accepted: %s", task_id, error, extra=self._ids(task_id))
            return
        with self._lock:
            held = self._jobs.get(task_id)
        if held is not None and held.action == action:
            # The server repeats a dispatch until it hears the acknowledgement; the work is
            # already running here.
            return
        if held is not None:
            # A plan whose outcome the server has already taken (the answer was lost) while
            # its apply is dispatched: the plan job is stale, and its retried report would
            # only get a 409.
            self._cancel(task_id, f"superseded by the {action}")
        job = _Job(
            task_id=task_id,
            agent_id=agent_id,
            workspace_id=str(assignment.get("workspace_id", "")),
            task_type=str(assignment.get("task_type", "plan")),
            action=action,
            reuse_workdir=bool(assignment.get("reuse_workdir", False)),
        )
        with self._lock:
            self._jobs[task_id] = job
        logger.info(
            "task #%s: %s %s on %s[%s]%s",
            task_id,
            job.action,
            job.task_type,
            assignment.get("pod"),
            assignment.get("slot"),
            " reusing the plan's working directory" if job.reuse_workdir else "",
            extra=self._ids(task_id, pod=str(assignment.get("pod") or "")),
        )
        threading.Thread(
            target=self._work, args=(job,), name=f"agent-{self.name}-task-{task_id}", daemon=True
        ).start()

    def _work(self, job: _Job) -> None:
        try:
            outcome = self._run_command(job) if self.command else self._simulate(job)
        except Exception as error:  # the task fails, the agent lives on
            logger.exception("task #%s crashed", job.task_id, extra=self._ids(job.task_id))
            outcome = Outcome("failed", f"reference agent error: {error}")
        if outcome is None or job.cancelled.is_set():
            return
        with self._lock:
            job.outcome = outcome
        self._report(job)

    def _simulate(self, job: _Job) -> Outcome | None:
        sim = self.simulation
        duration = sim.duration_seconds * self._random.uniform(0.7, 1.3)
        if job.cancelled.wait(duration):
            return None
        if self._random.random() < sim.failure_ratio:
            return Outcome("failed", f"simulated failure of the {job.action}")
        if job.action == "apply":
            return Outcome("applied")
        if job.task_type != "plan_and_apply":
            return Outcome("success")
        if self._random.random() < sim.changes_ratio:
            return Outcome("apply_pending")
        return Outcome("planned_and_finished")

    def _run_command(self, job: _Job) -> Outcome | None:
        assert self.command is not None
        # The command (terraform, a user's script) gets no credential of this agent: what it
        # prints ends up in the task's error message, and it has no business with the token.
        env = {
            **{k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV},
            "TASK_ID": str(job.task_id),
            "WORKSPACE_ID": job.workspace_id,
            "ACTION": job.action,
            "TASK_TYPE": job.task_type,
            "REUSE_WORKDIR": "true" if job.reuse_workdir else "false",
        }
        with self._lock:
            if job.cancelled.is_set():
                return None
            # Its own session, so a cancel reaches the children of the shell too.
            process = subprocess.Popen(
                self.command,
                shell=True,
                env=env,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            job.process = process
        assert process.stderr is not None
        tail: deque[str] = deque()
        size = 0
        for line in iter(process.stderr.readline, b""):
            text = line.decode(errors="replace")
            tail.append(text)
            size += len(text)
            while size > STDERR_TAIL_CHARS and len(tail) > 1:
                size -= len(tail.popleft())
        code = process.wait()
        if job.cancelled.is_set():
            return None
        if code == 0:
            if job.action == "apply":
                return Outcome("applied")
            return Outcome(
                "planned_and_finished" if job.task_type == "plan_and_apply" else "success"
            )
        if code == EXIT_CHANGES and job.action == "plan" and job.task_type == "plan_and_apply":
            return Outcome("apply_pending")
        stderr = "".join(tail)[-STDERR_TAIL_CHARS:].strip()
        return Outcome("failed", f"command exited with {code}" + (f": {stderr}" if stderr else ""))

    def _cancel(self, task_id: int, reason: str) -> None:
        with self._lock:
            job = self._jobs.pop(task_id, None)
            if job is None:
                return
            job.cancelled.set()
            process = job.process
        logger.info(
            "task #%s cancelled: %s",
            task_id,
            reason or "by the server",
            extra=self._ids(task_id),
        )
        if process is not None:
            _terminate(process)

    # --- reports ------------------------------------------------------------------------------

    def _report_finished(self) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j.outcome and not j.reporting]
        for job in finished:
            self._report(job)

    def _report(self, job: _Job) -> None:
        """Deliver a job's outcome once: whoever claims the job (its thread right away, or a
        later step after a failed attempt) reports it."""
        with self._lock:
            if job.reporting or job.outcome is None or self._jobs.get(job.task_id) is not job:
                return
            job.reporting = True
            outcome = job.outcome
        done = False
        ids = self._ids(job.task_id)
        try:
            self._call_as_agent(
                "PUT",
                f"/api/v1/agents/tasks/{job.task_id}/status",
                {
                    "agent_id": job.agent_id,
                    "status": outcome.status,
                    "error_message": outcome.error_message,
                },
            )
            logger.info("task #%s: reported %s", job.task_id, outcome.status, extra=ids)
            done = True
        except AgentApiError as error:
            if error.status == 409:
                logger.info(
                    "task #%s: the server already decided (%s)", job.task_id, error, extra=ids
                )
                done = True
            elif error.status >= 500 or error.status == 401 or _identity_refused(error):
                logger.warning(
                    "task #%s: report failed, will retry: %s", job.task_id, error, extra=ids
                )
            else:
                logger.error(
                    "task #%s: report refused, dropping it: %s", job.task_id, error, extra=ids
                )
                done = True
        except AgentTransportError as error:
            logger.warning("task #%s: report failed, will retry: %s", job.task_id, error, extra=ids)
        except Exception:
            logger.exception("task #%s: report failed, will retry", job.task_id, extra=ids)
        finally:
            with self._lock:
                job.reporting = False
                if done and self._jobs.get(job.task_id) is job:
                    del self._jobs[job.task_id]


def identity_save(path: Path, *, name: str, agent_id: str, secret: str) -> None:
    """An agent's identity in its state file, which `ReferenceAgent(state_file=...)` reads.
    Written to a new file and renamed over the old one, readable by this user only: a crash
    never leaves half a secret, and nobody else reads it."""
    state = {"name": name, "agent_id": agent_id, "agent_secret": secret}
    partial = path.with_name(path.name + ".new")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(state, handle)
    os.replace(partial, path)


def _identity_refused(error: AgentApiError) -> bool:
    """The server took the pool token but not the agent secret: register again."""
    return error.status == 403 and error.field == "agent_secret"


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _usage() -> dict[str, float | None]:
    """Load average and this process's peak memory (MiB), where the platform tells."""
    try:
        cpu: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        cpu = None
    try:
        import resource

        memory: float | None = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        memory = None
    return {"cpu": cpu, "memory": memory}


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    _signal_group(process, signal.SIGTERM)
    timer = threading.Timer(KILL_AFTER_SECONDS, _signal_group, (process, signal.SIGKILL))
    timer.daemon = True
    timer.start()

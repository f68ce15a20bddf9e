"""Issue 10 item 6: the logs of a real run are JSON, carry the ids, and hold no secret.

Real processes, as in production: a daphne web process, `manage.py worker` and two
`manage.py agent` processes, all with LOG_FORMAT=json at DEBUG, on a database of their own. A
plan and a plan_and_apply run to the end (the apply confirmed through the admin API), and
along the way the things that tempt code to log a credential happen: a wrong pool token, a
wrong agent secret, a wrong API token, a wrong password at the login form. The test made
every secret, so it can look for each in everything the processes wrote: none is there, every
line the processes logged parses as one JSON object, and the lines about our tasks carry
their ids.

The agents' work is a shell command that fails the task if it finds the pool token in its
environment: a task's command has no business with the agent's credential.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from poolsadmin.kube.fake_api import start_fake_kube
from tests.e2e.processes import until
from tests.processes import MANAGE, ROOT, free_port

WORK = (
    'if [ -n "$POOLSADMIN_AGENT_TOKEN" ]; then echo "token leaked" >&2; exit 1; fi; '
    'if [ "$TASK_TYPE" = plan_and_apply ] && [ "$ACTION" = plan ]; then exit 2; fi; exit 0'
)

SEED = """
import json
from django.contrib.auth.models import Group, User
from poolsadmin.api.roles import ROLE_ADMIN
from poolsadmin.api.services import api_token_create
from poolsadmin.pools.services import pool_create, pool_token_create
from poolsadmin.tasks.services import workspace_create
pool = pool_create(name="logs", actor="test")
token = pool_token_create(pool=pool, name="agents", actor="test").secret
user = User.objects.create_user(username="ops", password="right-horse-battery-staple")
user.groups.add(Group.objects.get(name=ROLE_ADMIN))
api = api_token_create(user=user, name="test")[1]
workspaces = [workspace_create(name=n, pool=pool, actor="test").pk for n in ("plan", "apply")]
print(json.dumps({"pool": pool.pool_id, "token": token, "api": api, "workspaces": workspaces}))
"""


def _call(
    url: str, token: str, method: str = "GET", body: dict[str, Any] | None = None, **headers: str
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_a_run_logs_json_lines_with_the_ids_and_no_token_or_secret(
    database_env: dict[str, str], tmp_path: Path
) -> None:
    fake = start_fake_kube(auto_run=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    kube_token = "kube-" + secrets.token_hex(16)
    env = {
        **os.environ,
        **database_env,
        "DEBUG": "false",
        "SECRET_KEY": "logs-test-" + secrets.token_hex(16),
        "ALLOWED_HOSTS": "127.0.0.1",
        # Plain HTTP on loopback, with the login form's cookies.
        "SECURE_SSL_REDIRECT": "false",
        "CSRF_COOKIE_SECURE": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CHANNEL_LAYER_URL": "",
        "KUBE_MODE": "url",
        "KUBE_API_URL": fake.url,
        "KUBE_TOKEN": kube_token,
        "POOLSADMIN_PUBLIC_URL": url,
        "POOLSADMIN_HEARING_TICK_SECONDS": "0.5",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "LOG_REQUESTS": "true",
    }

    def manage(*args: str) -> str:
        done = subprocess.run(
            [*MANAGE, *args], env=env, cwd=ROOT, check=True, capture_output=True, text=True
        )
        return done.stdout

    processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, argv: list[str], **extra_env: str) -> None:
        out = (tmp_path / f"{name}.out").open("wb")
        err = (tmp_path / f"{name}.err").open("wb")
        processes[name] = subprocess.Popen(
            argv, env={**env, **extra_env}, cwd=ROOT, stdout=out, stderr=err
        )

    manage("migrate", "-v0")
    seed = json.loads(manage("shell", "-c", SEED).strip().splitlines()[-1])
    api = f"{url}/api/v1"
    try:
        spawn(
            "web",
            [sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
             "poolsadmin.asgi:application"],
        )  # fmt: skip
        until(lambda: _up(url), "the web process to answer", process=processes["web"])
        spawn("worker", [*MANAGE, "worker"])
        for name in ("agent-a", "agent-b"):
            spawn(
                name,
                [*MANAGE, "agent", "--url", url, "--name", name, "--interval", "0.3",
                 "--command", WORK, "--state-file", str(tmp_path / f"{name}.json")],
                POOLSADMIN_AGENT_TOKEN=seed["token"],
            )  # fmt: skip
        until(lambda: all((tmp_path / f"{n}.json").exists() for n in ("agent-a", "agent-b")),
              "both agents registered")  # fmt: skip
        agent_secrets = {
            json.loads((tmp_path / f"{n}.json").read_text())["agent_secret"]
            for n in ("agent-a", "agent-b")
        }
        agent_ids = {
            json.loads((tmp_path / f"{n}.json").read_text())["agent_id"]
            for n in ("agent-a", "agent-b")
        }

        # Wrong credentials of every kind, shaped like real ones (which a careless log line
        # would print just as well).
        wrong_token = f"apt_{seed['pool']}_{secrets.token_hex(32)}"
        wrong_secret = f"ags_{secrets.token_hex(32)}"
        wrong_api = f"pat_{secrets.token_hex(32)}"
        assert _call(f"{api}/agents/register", wrong_token, "POST", {"name": "x"})[0] == 401
        some_agent = sorted(agent_ids)[0]
        assert (
            _call(
                f"{api}/agents/{some_agent}/heartbeat",
                seed["token"],
                "POST",
                {"running_task_ids": []},
                **{"X-Agent-Secret": wrong_secret},
            )[0]
            == 403
        )
        assert _call(f"{api}/pools", wrong_api)[0] == 401
        _login(url, "ops", "wrong-password-" + secrets.token_hex(8))

        token = seed["api"]
        plan_ws, apply_ws = seed["workspaces"]
        plan = _call(f"{api}/workspaces/{plan_ws}/tasks", token, "POST", {"task_type": "plan"})
        pa = _call(
            f"{api}/workspaces/{apply_ws}/tasks", token, "POST", {"task_type": "plan_and_apply"}
        )
        plan_id, pa_id = plan[1]["id"], pa[1]["id"]

        def task(task_id: int) -> dict[str, Any]:
            return dict(_call(f"{api}/tasks/{task_id}", token)[1])

        until(
            lambda: task(pa_id)["status"] == "apply_pending", "the plan_and_apply plan", deadline=30
        )
        assert _call(f"{api}/tasks/{pa_id}/confirm-apply", token, "POST", {})[0] == 200
        finished = {"success", "applied", "failed", "cancelled", "planned_and_finished"}
        until(
            lambda: task(plan_id)["status"] in finished and task(pa_id)["status"] in finished,
            "both tasks finished",
        )
        statuses = (task(plan_id)["status"], task(pa_id)["status"])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        fake.stop()

    written = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.out")}
    written |= {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.err")}
    everything = "\n".join(written.values())
    assert statuses == ("success", "applied"), everything

    known = {
        "pool token": seed["token"],
        "API token": seed["api"],
        "Kubernetes token": kube_token,
        "wrong pool token": wrong_token,
        "wrong agent secret": wrong_secret,
        "wrong API token": wrong_api,
        "password": "right-horse-battery-staple",
        **{f"agent secret {i}": s for i, s in enumerate(sorted(agent_secrets))},
    }
    for what, secret in known.items():
        leaks = [name for name, text in written.items() if secret in text]
        assert not leaks, f"the {what} appears in {leaks}"

    lines: list[dict[str, Any]] = []
    for name, text in written.items():
        if not name.endswith(".err"):
            continue  # stdout holds the commands' own output ("worker: running ..."), not logs
        for line in text.splitlines():
            try:
                fields = json.loads(line)
            except ValueError:
                raise AssertionError(f"{name}: not a JSON line: {line!r}") from None
            assert isinstance(fields, dict) and {"time", "level", "logger", "message"} <= set(
                fields
            ), line
            lines.append(fields | {"_file": name})

    def about(task_id: int) -> set[str]:
        return {f["_file"] for f in lines if f.get("task_id") == task_id}

    # Both sides of each task log about it with its id: the worker dispatching it, the agent
    # running and reporting it.
    for task_id in (plan_id, pa_id):
        assert "worker.err" in about(task_id), task_id
        assert about(task_id) & {"agent-a.err", "agent-b.err"}, task_id
    dispatched = [f for f in lines if f["message"].startswith(f"dispatched task {pa_id} ")]
    assert dispatched and all(
        f["pool_id"] == seed["pool"] and f["agent_id"] in agent_ids and f["pod"] for f in dispatched
    ), dispatched
    agent_lines = [f for f in lines if f["_file"].startswith("agent-") and "task_id" in f]
    assert all(f.get("agent_id") in agent_ids for f in agent_lines), agent_lines
    # The failed login reached django-axes, which masks the username it logs.
    assert any(f["logger"].startswith("axes") and "login failure" in f["message"] for f in lines)
    # Django's request log came out as JSON too, with the path instead of the request.
    refused = [f for f in lines if f["logger"] == "django.request"]
    assert any(f.get("path") == "/api/v1/agents/register" for f in refused), refused
    # The request log (LOG_REQUESTS) replaces daphne's plain one, with the URL's ids.
    assert written["web.out"] == ""
    requests = [f for f in lines if f["logger"] == "poolsadmin.request"]
    reports = [f for f in requests if f["path"] == f"/api/v1/agents/tasks/{pa_id}/status"]
    assert reports and all(f["task_id"] == pa_id and f["status_code"] for f in reports)
    heartbeats = [f for f in requests if f["path"].endswith("/heartbeat")]
    assert {f["agent_id"] for f in heartbeats} == agent_ids


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/login/", timeout=2):
            return True
    except OSError:
        return False


def _login(url: str, username: str, password: str) -> None:
    """A failed login through the form, with its CSRF cookie, as a browser sends it."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(f"{url}/login/", timeout=10) as page:
        html = page.read().decode()
    csrf = html.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf}
    ).encode()
    request = urllib.request.Request(f"{url}/login/", data=form, headers={"Referer": url})
    with contextlib.suppress(urllib.error.HTTPError):  # a refusal is the point
        opener.open(request, timeout=10).read()

"""Log lines: JSON with the ids (LOG_FORMAT=json), plain otherwise, and no secret in either."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import RequestFactory

from poolsadmin.lib.logs import (
    JsonLineFormatter,
    PlainFormatter,
    log_ids,
    logging_config,
    redact,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "apt_pool-abcdefghij012345_" + "ab" * 32
SECRET = "ags_" + "cd" * 32
API_TOKEN = "pat_" + "ef" * 32


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("poolsadmin.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_the_json_formatter_writes_one_object_per_line_with_the_ids_as_fields() -> None:
    record = _record("dispatched task %s", 598, **log_ids(task=598, pool="pool-x", pod="p-1"))
    line = JsonLineFormatter().format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "dispatched task 598"
    assert (fields["task_id"], fields["pool_id"], fields["pod"]) == (598, "pool-x", "p-1")
    assert "agent_id" not in fields  # only the ids given
    assert (fields["level"], fields["logger"]) == ("INFO", "poolsadmin.test")
    assert fields["time"].endswith("+00:00")


def test_a_traceback_stays_inside_the_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonLineFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "ValueError: boom" in json.loads(line)["exc_info"]


def test_a_request_on_a_django_log_line_becomes_its_method_and_path_not_its_headers() -> None:
    request = RequestFactory().post("/api/v1/agents/register", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    line = JsonLineFormatter().format(_record("Unauthorized: %s", request.path, request=request))
    fields = json.loads(line)
    assert (fields["method"], fields["path"]) == ("POST", "/api/v1/agents/register")
    assert "request" not in fields
    assert TOKEN not in line


@pytest.mark.parametrize("formatter", [JsonLineFormatter(), PlainFormatter()])
def test_no_token_or_secret_survives_either_format(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("got %s and %s from %s", TOKEN, SECRET, API_TOKEN))
    for secret in (TOKEN, SECRET, API_TOKEN):
        assert secret not in line
    assert "apt_pool-abcdefghij012345_<redacted>" in line
    assert "ags_<redacted>" in line and "pat_<redacted>" in line


def test_redaction_leaves_ids_and_ordinary_words_alone() -> None:
    text = "task #598 of pool-z73eh8ihywlmgx0x on agent-abc, pat_ and apt_ are prefixes"
    assert redact(text) == text


def test_the_plain_format_reads_as_before() -> None:
    config = logging_config(log_format="plain", level="INFO")
    formatter = PlainFormatter(config["formatters"]["default"]["format"])
    line = formatter.format(_record("dispatched task %s", 598, **log_ids(task=598)))
    assert line.endswith(" INFO poolsadmin.test: dispatched task 598")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' is not one of plain, json"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD' is not one of"),
    ],
)
def test_a_bad_log_setting_stops_start_up_naming_it(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_a_process_started_with_log_format_json_writes_django_lines_as_json() -> None:
    code = (
        "import logging, django; django.setup(); "
        "logging.getLogger('django.request').warning('Not Found: /x'); "
        "logging.getLogger('daphne.server').info('listening')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "poolsadmin.settings",
            "LOG_FORMAT": "json",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(f["logger"], f["message"]) for f in lines] == [
        ("django.request", "Not Found: /x"),
        ("daphne.server", "listening"),
    ]

"""Bad input to the dashboard (issue 8, item 4): a URL, query parameter or form field that is
not clean text is a 400 page (or, in the action dialog, the dialog's content) naming the
field, never a 500, and the action does nothing."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, PoolStatus, Slot
from tests.ledger import make_agent, make_pool, pod_of

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"


def named_field(html: str) -> str | None:
    """The field the page's error names (`data-field`), if any."""
    match = re.search(r'id="form-error" data-field="([^"]*)"', html)
    return match.group(1) if match else None


@pytest.fixture
def pool() -> AgentPool:
    return make_pool(name="blue")


def test_a_nul_byte_in_an_audit_filter_is_a_400_page_naming_the_filter(
    admin_client: Client,
) -> None:
    response = admin_client.get("/audit/?pool=%00")

    assert response.status_code == 400
    assert named_field(response.content.decode()) == "pool"


def test_a_nul_byte_in_a_reason_is_a_400_naming_reason_and_the_pool_is_not_paused(
    admin_client: Client, pool: AgentPool
) -> None:
    events = Event.objects.count()

    response = admin_client.post(
        f"/pools/{pool.pool_id}/pause/", "reason=maintenance%00", content_type=FORM
    )

    assert response.status_code == 400
    assert named_field(response.content.decode()) == "reason"
    pool.refresh_from_db()
    assert pool.status == PoolStatus.ACTIVE
    assert Event.objects.count() == events


def test_a_nul_byte_in_the_pool_id_of_an_action_url_is_a_400_naming_pool_id(
    admin_client: Client,
) -> None:
    response = admin_client.post("/pools/pool-%00/pause/", "reason=maintenance", content_type=FORM)

    assert response.status_code == 400
    assert named_field(response.content.decode()) == "pool_id"


def test_in_the_action_dialog_bad_input_answers_the_dialogs_content_naming_the_field(
    admin_client: Client, pool: AgentPool
) -> None:
    response = admin_client.post(
        f"/pools/{pool.pool_id}/pause/",
        "reason=maintenance%00",
        content_type=FORM,
        headers={"HX-Request": "true"},
    )

    html = response.content.decode()
    assert response.status_code == 400
    assert named_field(html) == "reason"
    assert "<html" not in html
    assert "data-dialog-close" in html


@pytest.mark.parametrize("task", ["²", "not-a-number", "1" * 19])
def test_a_task_filter_that_is_not_a_task_number_is_a_400_naming_task(
    viewer_client: Client, task: str
) -> None:
    # "²" passes str.isdigit() and then failed int() with a 500.
    page = viewer_client.get("/audit/", {"task": task})
    results = viewer_client.get("/audit/", {"task": task}, headers={"HX-Request": "true"})

    assert page.status_code == results.status_code == 400
    assert named_field(page.content.decode()) == named_field(results.content.decode()) == "task"
    assert f'name="task" value="{task}" inputmode="numeric" aria-invalid="true"' in (
        page.content.decode()
    )


def test_a_refused_action_form_names_the_field_it_is_about(
    admin_client: Client, pool: AgentPool
) -> None:
    k8s = make_pool(name="kube", pool_type="k8s", pod_image="img", max_replicas=3)
    slot = Slot.objects.get(pod=pod_of(make_agent(pool, "P1")), index=0)

    def refused(url: str, form: str) -> str | None:
        response = admin_client.post(url, form, content_type=FORM)
        assert response.status_code == 400
        return named_field(response.content.decode())

    assert refused(f"/slots/{slot.pk}/release/", "expected_version=1") == "reason"
    assert refused(f"/pools/{pool.pool_id}/pause/", "reason=") == "reason"
    scale = f"/pools/{k8s.pool_id}/scale/"
    assert refused(scale, "min_replicas=abc&max_replicas=2&reason=r") == "min_replicas"
    assert refused(scale, "min_replicas=0&max_replicas=1001&reason=r") == "max_replicas"
    assert refused(f"/pools/{pool.pool_id}/scale/", "reason=r") == "pool_type"


def test_a_session_cookie_with_a_nul_byte_is_no_session() -> None:
    # Any client sets its cookies; the quoted form is how a cookie carries a NUL byte.
    cookie = {"Cookie": 'sessionid="abcdefgh\\000ijkl"'}

    page = Client().get("/pools/", headers=cookie)
    api = Client().get("/api/v1/pools", headers=cookie)

    assert page.status_code == 302
    assert page["Location"].startswith("/login/")
    assert (api.status_code, api.json()["error"]) == (401, "unauthenticated")

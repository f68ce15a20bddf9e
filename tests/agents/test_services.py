"""Agent registration and authentication: per-agent secrets, re-registration, the race of two
first registrations of one name, and pod links."""

from __future__ import annotations

import contextlib
import hmac
import threading
from typing import Any

import pytest
from django.db import connections
from django.db.models.signals import pre_save

from poolsadmin.agents import services
from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import (
    Registration,
    agent_authenticate,
    agent_heartbeat,
    agent_register,
    agent_retire,
)
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, Forbidden, InvalidInput, NotFound
from poolsadmin.lib.ids import sha256_hex
from poolsadmin.pools.models import AgentPool, Pod, PodPhase, PoolType, Slot
from poolsadmin.pools.services import pod_create
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import TaskStatus
from tests.conftest import IS_POSTGRES
from tests.ledger import (
    ADMIN,
    make_agent,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    refresh,
    run,
    submit,
)


def k8s_pool() -> AgentPool:
    return make_pool(name="k8s", pool_type=PoolType.K8S, pod_image="agent:1", max_replicas=3)


def kinds(target_id: str) -> list[str]:
    return list(
        Event.objects.filter(target_id=target_id).order_by("id").values_list("kind", flat=True)
    )


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_registration_issues_a_secret_and_stores_only_its_hash() -> None:
    registration = agent_register(pool=make_pool(), name="P1")

    assert isinstance(registration, Registration)
    assert registration.secret.startswith("ags_") and len(registration.secret) == 4 + 64
    stored = Agent.objects.get(pk=registration.agent.pk)
    assert stored.secret_hash == sha256_hex(registration.secret)
    assert registration.secret not in str(list(Event.objects.values()))


@pytest.mark.django_db
def test_registering_again_rotates_the_secret_with_an_event() -> None:
    pool = make_pool()
    first = agent_register(pool=pool, name="P1")

    second = agent_register(pool=pool, name="P1", version="2", secret=first.secret)

    assert second.agent.agent_id == first.agent.agent_id
    assert second.secret != first.secret
    assert agent_authenticate(
        pool_id=pool.pool_id, agent_id=first.agent.agent_id, secret=second.secret
    )
    with pytest.raises(Forbidden) as refused:
        agent_authenticate(pool_id=pool.pool_id, agent_id=first.agent.agent_id, secret=first.secret)
    assert refused.value.field == "agent_secret"
    event = Event.objects.get(kind="agent.reregistered")
    assert event.after is not None and event.after["secret_rotated"] is True
    assert "rotated" in event.reason


@pytest.mark.django_db
def test_agent_authenticate_accepts_only_the_agents_own_secret_of_the_pool() -> None:
    pool, other_pool = make_pool(name="p1"), make_pool(name="p2")
    p1, p2 = make_agent_with_secret(pool, "P1"), make_agent_with_secret(pool, "P2")
    stranger = make_agent_with_secret(other_pool, "Q1")

    assert (
        agent_authenticate(pool_id=pool.pool_id, agent_id=p1.agent.agent_id, secret=p1.secret)
        == p1.agent
    )
    for secret in ["", "ags_" + "0" * 64, p2.secret]:
        with pytest.raises(Forbidden):
            agent_authenticate(pool_id=pool.pool_id, agent_id=p1.agent.agent_id, secret=secret)
    with pytest.raises(Forbidden):  # its own secret, but the token's pool is not its pool
        agent_authenticate(
            pool_id=pool.pool_id, agent_id=stranger.agent.agent_id, secret=stranger.secret
        )
    with pytest.raises(NotFound):
        agent_authenticate(pool_id=pool.pool_id, agent_id="agent-doesnotexist000", secret=p1.secret)


@pytest.mark.django_db
def test_agent_authenticate_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool()
    registration = make_agent_with_secret(pool, "P1")
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(services.hmac, "compare_digest", spy)

    agent_authenticate(
        pool_id=pool.pool_id, agent_id=registration.agent.agent_id, secret=registration.secret
    )

    assert len(calls) == 1


# --- the race of two first registrations of one name -------------------------------------------


@pytest.mark.django_db
def test_a_first_registration_that_loses_the_race_is_refused_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deterministic: the winner's row is already there, but this registration's locking read
    ran before it committed and saw nothing (select_for_update locks no missing row). Two
    registrations of one name at once: one is an impostor or a duplicate, and without the
    winner's secret the loser proves nothing."""
    pool = make_pool()
    winner = agent_register(pool=pool, name="P1")
    real = services._agent_named
    reads: list[Agent | None] = []

    def read_before_the_winner_committed(**kwargs: Any) -> Agent | None:
        found = None if not reads else real(**kwargs)
        reads.append(found)
        return found

    monkeypatch.setattr(services, "_agent_named", read_before_the_winner_committed)

    with pytest.raises(Conflict) as refused:
        agent_register(pool=pool, name="P1")

    assert refused.value.field == "name"
    assert Agent.objects.filter(pool=pool, agent_name="P1").count() == 1
    assert Pod.objects.filter(pool=pool, name="P1").count() == 1
    assert kinds(winner.agent.agent_id) == ["agent.registered"]
    assert agent_authenticate(
        pool_id=pool.pool_id, agent_id=winner.agent.agent_id, secret=winner.secret
    )


@pytest.mark.django_db(transaction=True)
def test_of_two_concurrent_first_registrations_of_one_name_exactly_one_succeeds() -> None:
    """Real threads, each with its own connection. Both wait just before inserting the agent
    row, so both have read "no such agent": on PostgreSQL one insert then waits for the other
    to commit and hits the unique constraint. On SQLite the IMMEDIATE transactions serialise
    the two, so the second never gets that far: the barrier times out, and the outcome must
    be the same."""
    pool = make_pool()
    barrier = threading.Barrier(2, timeout=10 if IS_POSTGRES else 1)
    results: list[Registration] = []
    errors: list[BaseException] = []

    def before_insert(sender: type[Agent], instance: Agent, **kwargs: Any) -> None:
        # SQLite: the other registration waits at BEGIN and never gets here (docstring).
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()

    refused: list[Conflict] = []

    def register() -> None:
        try:
            results.append(agent_register(pool=pool, name="agent-1"))
        except Conflict as exc:
            refused.append(exc)
        except BaseException as exc:  # surfaced below: a thread must not fail silently
            errors.append(exc)
        finally:
            connections.close_all()

    pre_save.connect(before_insert, sender=Agent, dispatch_uid="race")
    try:
        threads = [threading.Thread(target=register) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        pre_save.disconnect(sender=Agent, dispatch_uid="race")

    assert not errors, errors
    assert (len(results), len(refused)) == (1, 1)
    agent = Agent.objects.get(pool=pool, agent_name="agent-1")
    assert Pod.objects.get(pool=pool, name="agent-1").agent_id == agent.agent_id
    assert kinds(agent.agent_id) == ["agent.registered"]
    assert agent.secret_hash == sha256_hex(results[0].secret)


# --- pods --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_same_agent_name_in_two_static_pools_gets_a_pod_in_each() -> None:
    blue, green = make_pool(name="blue"), make_pool(name="green")

    in_blue, in_green = make_agent(blue, "agent-1"), make_agent(green, "agent-1")

    assert in_blue.agent_id != in_green.agent_id
    assert Pod.objects.get(pool=blue, name="agent-1").agent_id == in_blue.agent_id
    assert Pod.objects.get(pool=green, name="agent-1").agent_id == in_green.agent_id
    assert Slot.objects.filter(pod__name="agent-1").count() == 2 * blue.slots_per_pod


@pytest.mark.django_db
def test_registering_in_a_k8s_pool_links_the_agent_to_its_pod_with_an_event() -> None:
    pool = k8s_pool()
    pod = pod_create(pool=pool, name="agent-abc12", phase=PodPhase.RUNNING, actor="kube")

    registration = make_agent_with_secret(pool, "agent-abc12")
    agent = registration.agent
    # Registering again changes no link: no second event.
    agent_register(pool=pool, name="agent-abc12", secret=registration.secret)

    pod.refresh_from_db()
    assert pod.agent_id == agent.agent_id
    linked = Event.objects.filter(kind="pod.agent_linked", target_id="agent-abc12")
    assert [(e.actor, e.before, e.after) for e in linked] == [
        (f"agent:{agent.agent_id}", {"agent_id": None}, {"agent_id": agent.agent_id})
    ]
    assert linked.get().pool_id == pool.pool_id


@pytest.mark.django_db
def test_a_k8s_agent_whose_pod_is_not_known_yet_registers_without_a_pod() -> None:
    pool = k8s_pool()

    agent = make_agent(pool, "agent-new01")

    assert not Pod.objects.filter(pool=pool).exists()
    assert not Event.objects.filter(kind="pod.agent_linked").exists()
    assert Agent.objects.filter(pk=agent.pk).exists()


@pytest.mark.django_db
def test_a_static_agent_takes_over_its_orphaned_pod_with_an_event() -> None:
    pool = make_pool()
    # A pod whose agent row is gone (Pod.agent is SET_NULL): the agent registers again.
    pod = pod_create(pool=pool, name="P1", phase=PodPhase.RUNNING, actor=ADMIN)

    agent = make_agent(pool, "P1")

    assert Pod.objects.get(pk=pod.pk).agent_id == agent.agent_id
    assert Pod.objects.filter(pool=pool).count() == 1
    assert Event.objects.filter(kind="pod.agent_linked", target_id="P1").count() == 1


@pytest.mark.django_db
def test_a_pod_link_is_undone_with_the_registration_that_made_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = k8s_pool()
    pod = pod_create(pool=pool, name="agent-abc12", phase=PodPhase.RUNNING, actor="kube")

    def fail(**kwargs: Any) -> None:
        raise RuntimeError("after the pod link, before commit")

    monkeypatch.setattr(services, "broadcast_pool_changed", fail)
    with pytest.raises(RuntimeError):
        agent_register(pool=pool, name="agent-abc12")

    assert Pod.objects.get(pk=pod.pk).agent_id is None
    assert not Agent.objects.exists()
    assert not Event.objects.filter(kind__in=["pod.agent_linked", "agent.registered"]).exists()


# --- a registration whose answer was lost is sent again ----------------------------------------

PROPOSED = "ags_" + "1" * 64
NEXT = "ags_" + "2" * 64


@pytest.mark.django_db
def test_a_first_registration_whose_answer_was_lost_is_sent_again_and_proves_itself() -> None:
    """It committed, the answer timed out: the agent sends the same request, with the secret it
    proposed, and is the agent it registered (not a 409 for a name taken by itself)."""
    pool = make_pool()
    first = agent_register(pool=pool, name="P1", proposed_secret=PROPOSED)

    again = agent_register(pool=pool, name="P1", proposed_secret=PROPOSED)

    assert again.agent.agent_id == first.agent.agent_id and again.secret == PROPOSED
    assert agent_authenticate(pool_id=pool.pool_id, agent_id=again.agent.agent_id, secret=PROPOSED)


@pytest.mark.django_db
def test_a_rotation_whose_answer_was_lost_is_sent_again_and_proves_itself() -> None:
    pool = make_pool()
    first = agent_register(pool=pool, name="P1", proposed_secret=PROPOSED)
    agent_register(pool=pool, name="P1", secret=PROPOSED, proposed_secret=NEXT)  # answer lost

    # The agent still holds the old secret; the retry proves itself with the proposed one.
    again = agent_register(pool=pool, name="P1", secret=PROPOSED, proposed_secret=NEXT)

    assert again.agent.agent_id == first.agent.agent_id
    assert agent_authenticate(pool_id=pool.pool_id, agent_id=first.agent.agent_id, secret=NEXT)


@pytest.mark.django_db
def test_a_proposed_secret_must_look_like_one() -> None:
    with pytest.raises(InvalidInput) as refused:
        agent_register(pool=make_pool(), name="P1", proposed_secret="password")
    assert refused.value.field == "agent_secret"
    assert not Agent.objects.exists()


@pytest.mark.django_db
def test_retiring_an_agent_fails_its_acknowledged_work_and_leaves_a_dispatch_to_the_scheduler() -> (
    None
):
    pool = make_pool()
    registration = make_agent_with_secret(pool, "P1")
    acked = run(submit(make_workspace(pool), "plan"))
    sent = submit(make_workspace(pool), "plan")
    assert task_dispatch(task_id=sent.pk).dispatched

    agent_retire(agent=registration.agent, actor="user:alice", reason="lost its disk")

    assert refresh(acked).status == TaskStatus.FAILED
    assert refresh(sent).status == TaskStatus.RUNNING  # rolled back after its ack timeout
    clock.advance(31)
    assert scheduler_pass().rolled_back == [sent.pk]


@pytest.mark.django_db
def test_a_heartbeat_after_retirement_does_not_bring_the_agent_back() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    agent_retire(agent=agent, actor="user:alice", reason="lost its disk")

    with pytest.raises(Forbidden):
        agent_heartbeat(agent=agent, running_task_ids=[])

    agent.refresh_from_db()
    assert agent.status == "offline" and agent.retired_at is not None
    assert not Event.objects.filter(kind="agent.online").exists()


@pytest.mark.django_db
def test_retiring_an_agent_unlinks_its_pod_through_the_pod_service() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")

    agent_retire(agent=agent, actor="user:alice", reason="lost its disk")

    assert Pod.objects.get(pool=pool, name="P1").agent_id is None
    unlinked = Event.objects.get(kind="pod.agent_unlinked", target_id="P1")
    assert unlinked.before == {"agent_id": agent.agent_id} and unlinked.actor == "user:alice"

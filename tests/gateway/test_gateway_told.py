"""A project's end counts as told to its app only once its frame was written: marked when it
was queued, an end lost with its socket (the writer stalls, then drops its queue) was never
replayed to the app's next socket, and the SDKs marked the project lost (rendered, charged,
never returned). Written is not read either: a new socket of the app gets a project whose
end was written in the last `REPLAY_TOLD` seconds again (the SDKs ignore a finished one)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import trio

from sogni_coordinator.gateway.core import Gateway
from sogni_coordinator.gateway.projects import REPLAY_TOLD, Outcome, Project, ProjectBook
from sogni_coordinator.gateway.socket import Session


async def test_a_projects_end_is_told_once_written_not_once_queued() -> None:
    project = Project("k1", "JOB1", 1, app_id="app")
    project.outcomes[0] = Outcome(ok=True, steps=3, seed=1)
    queued: list[tuple[str, Any]] = []

    async def send(name: str, data: dict[str, Any], *, then: Any = None) -> None:
        queued.append((name, then))  # queued for a writer that never writes it

    await Gateway._finish(cast(Gateway, None), project, send)
    assert [name for name, _ in queued] == ["jobState"] and not project.told
    book = ProjectBook(keep=3600)
    book.add(project)
    assert book.untold("k1", "app") == [project]  # the app's next socket gets it again
    queued[0][1]()  # the writer wrote it: the app may still not have read it
    assert project.told and book.untold("k1", "app") == [project]  # replayed a while
    later = project.told_at + REPLAY_TOLD + 1
    assert book.untold("k1", "app", now=later) == []


async def test_the_socket_writer_runs_then_after_the_frame_is_written() -> None:
    written: list[str] = []
    ws = SimpleNamespace(query_params={}, url=SimpleNamespace(scheme="http", netloc="x"))

    async def send_text(text: str) -> None:
        written.append(text)

    ws.send_text = send_text
    gateway = SimpleNamespace(config=SimpleNamespace(default_network="fast", public_url=None))
    session = Session(cast(Any, gateway), cast(Any, ws), cast(Any, None), "app")
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._write)
        await session.send(
            "jobState", {"type": "jobCompleted"}, then=lambda: seen.append(len(written))
        )
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen == [1]  # after its frame went out


async def test_a_reconnect_resumes_running_projects_before_replaying_ended_ones() -> None:
    """Ended projects replayed within `REPLAY_TOLD` took the socket's project slots in
    creation order: a project still running behind 32 ended ones was never resumed (the
    SDKs then mark it lost). Running ones come first; a replay does not extend its window."""
    ended = Project("k1", "ENDED", 1, app_id="app", told=True, told_at=1.0)
    running = Project("k1", "RUNNING", 1, app_id="app")
    resumed: list[str] = []

    async def untold(_key: Any, _app: str) -> list[Project]:
        return [ended, running]

    gateway = SimpleNamespace(
        config=SimpleNamespace(default_network="fast", public_url=None, max_projects_per_socket=1),
        untold=untold,
    )
    ws = SimpleNamespace(query_params={}, url=SimpleNamespace(scheme="http", netloc="x"))
    session = Session(cast(Any, gateway), cast(Any, ws), cast(Any, None), "app")

    async def reattached(project: Project) -> None:
        resumed.append(project.job_id)

    session._reattached = reattached  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        session._resume_in_flight(nursery, await session._owed())
    assert resumed == ["RUNNING"]
    # a replayed end written again keeps its first time: the window is not extended
    project = Project("k1", "JOB2", 1, app_id="app")
    project.outcomes[0] = Outcome(ok=True, steps=3, seed=1)
    thens: list[Any] = []

    async def send(name: str, data: dict[str, Any], *, then: Any = None) -> None:
        thens.append(then)

    await Gateway._finish(cast(Gateway, None), project, send)
    thens[0]()
    first = project.told_at
    await Gateway._finish(cast(Gateway, None), project, send)
    thens[1]()
    assert project.told_at == first

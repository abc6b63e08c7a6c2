from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.redis_server import RedisServer
from xml_pipeline.config.loader import load_organism
from xml_pipeline.memory.manager_backend import ManagerBackend
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.organism import Organism

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, the loop the daemon runs on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def example_organism() -> Organism:
    return load_organism(ROOT / "organism.yaml")


class HistoryLog:
    """Collects each finished conversation's history (the pump deletes it right after)."""

    def __init__(self) -> None:
        self.conversations: dict[str, tuple[Any, ...]] = {}

    def __call__(self, conversation_id: str, history: tuple[Any, ...]) -> None:
        self.conversations[conversation_id] = history


@pytest.fixture
def history_log() -> HistoryLog:
    return HistoryLog()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server per test process; tests isolate themselves by key prefix."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def manager_backend() -> Iterator[ManagerBackend]:
    backend = ManagerBackend.start()
    yield backend
    backend.close()


BACKENDS = ["memory", "manager", "redis"]
RECORD_KINDS = ["buffer", "sequence"]
"""The record kinds the orchestration registries keep, cleared like the buffer and the registry."""


def _empty_backend(kind: str, request: pytest.FixtureRequest) -> Iterator[SharedBackend]:
    if kind == "memory":
        yield InMemoryBackend()
    elif kind == "manager":
        shared: ManagerBackend = request.getfixturevalue("manager_backend")
        shared.buffer_clear()
        shared.registry_clear()
        for kind in RECORD_KINDS:
            shared.record_clear(kind)
        yield shared
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_backend = RedisBackend(server.url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
        yield redis_backend
        redis_backend.buffer_clear()
        redis_backend.registry_clear()
        for kind in RECORD_KINDS:
            redis_backend.record_clear(kind)
        redis_backend.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[SharedBackend]:
    """Each SharedBackend implementation, empty, for the same behavioural tests."""
    yield from _empty_backend(request.param, request)


@pytest.fixture(params=["manager", "redis"])
def shared_backend(request: pytest.FixtureRequest) -> Iterator[SharedBackend]:
    """The backends whose state other processes share (memory workers see none, by design)."""
    yield from _empty_backend(request.param, request)

"""Open the backend organism.yaml asks for, and check that it answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xml_pipeline.memory.manager_backend import ManagerBackend, ManagerSpec
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import DEFAULT_PREFIX, DEFAULT_TTL, RedisBackend, RedisSpec
from xml_pipeline.memory.shared_backend import BackendUnavailable, SharedBackend

BackendSpec = ManagerSpec | RedisSpec | None
"""What a worker process needs to reach the same state; None for the memory backend."""


def open_backend(settings: Mapping[str, Any]) -> SharedBackend:
    """The backend for ``settings`` (organism.yaml's ``backend`` section); raises BackendUnavailable."""
    kind = settings.get("type", "memory")
    backend: SharedBackend
    if kind == "memory":
        return InMemoryBackend()
    if kind == "manager":
        try:
            backend = ManagerBackend.start()
        except OSError as exc:
            raise BackendUnavailable(f"cannot start the state manager: {exc}") from None
    else:
        url = str(settings["redis_url"])
        backend = RedisBackend(
            url,
            prefix=str(settings.get("redis_prefix", DEFAULT_PREFIX)),
            ttl=int(settings.get("redis_ttl", DEFAULT_TTL)),
        )
        if not backend.ping():
            backend.close()
            raise BackendUnavailable(f"redis at {_without_password(url)} does not answer")
    return backend


def spec_of(backend: SharedBackend) -> BackendSpec:
    spec = getattr(backend, "spec", None)
    return spec if isinstance(spec, (ManagerSpec, RedisSpec)) else None


def _without_password(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + separator + rest

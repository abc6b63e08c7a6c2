"""Open the backend a BackendConfig (or organism.yaml's ``backend`` section) names, and check that it answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xml_pipeline.memory.manager_backend import ManagerBackend, ManagerSpec
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import RedisBackend, RedisSpec
from xml_pipeline.memory.shared_backend import BackendConfig, BackendUnavailable, SharedBackend

BackendSpec = ManagerSpec | RedisSpec | None
"""What a worker process needs to reach the same state; None for the memory backend."""


def open_backend(settings: Mapping[str, Any]) -> SharedBackend:
    """The daemon's backend for ``settings`` (organism.yaml's ``backend`` section); raises BackendUnavailable.

    Its pump's store watch probes the store off the event loop, so a Redis
    circuit, once open, waits for that probe rather than trying calls on the loop.
    """
    return create_backend(BackendConfig.from_settings(settings), probed_off_loop=True)


def create_backend(config: BackendConfig, *, probed_off_loop: bool = False) -> SharedBackend:
    """A new backend as ``config`` says; raises BackendUnavailable if it cannot be reached."""
    backend: SharedBackend
    if config.backend_type == "memory":
        return InMemoryBackend()
    if config.backend_type == "manager":
        try:
            backend = ManagerBackend(config.manager_address, config.manager_authkey)
        except OSError as exc:
            raise BackendUnavailable(f"cannot start the state manager: {exc}") from None
    else:
        backend = RedisBackend(
            config.redis_url,
            prefix=config.redis_prefix,
            ttl=config.redis_ttl,
            socket_timeout=config.redis_timeout_seconds,
            fail_fast_seconds=None if probed_off_loop else 1.0,
        )
        if not backend.ping():
            backend.close()
            raise BackendUnavailable(f"redis at {_without_password(config.redis_url)} does not answer")
    return backend


def spec_of(backend: SharedBackend) -> BackendSpec:
    spec = getattr(backend, "spec", None)
    return spec if isinstance(spec, (ManagerSpec, RedisSpec)) else None


def _without_password(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + separator + rest

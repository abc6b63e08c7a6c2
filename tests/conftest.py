from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from xml_pipeline.config.loader import load_organism
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

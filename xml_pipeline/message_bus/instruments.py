"""Where the pump's parts report to: its metrics and its observation, shared and replaceable.

A daemon puts its Prometheus metrics on the pump and a test may swap in an
observation with spans while the pump runs; every part reads them through this
one holder, so a swap reaches all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.observe.events import Observation


@dataclass(slots=True)
class Instruments:
    metrics: PumpMetrics
    observe: Observation

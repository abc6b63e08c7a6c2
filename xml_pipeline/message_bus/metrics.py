"""Hooks the pump calls as messages move; the default does nothing.

The daemon plugs in Prometheus counters (``xml_pipeline.daemon.metrics``);
embedding programs may plug in their own. Each hook is one cheap call on the
hot path, so implementations must not block.
"""

from __future__ import annotations

from xml_pipeline.message.system_payloads import ErrorCode


class PumpMetrics:
    def message_in(self, listener: str) -> None:
        """A message was dispatched to ``listener``'s handler."""

    def message_out(self, listener: str) -> None:
        """``listener``'s handler sent a message on (forward or response)."""

    def handler_finished(self, listener: str, seconds: float) -> None:
        """One call of ``listener``'s handler took ``seconds`` (whatever its outcome)."""

    def error(self, code: ErrorCode) -> None:
        """A SystemError was produced."""

    def ingress(self, accepted: bool) -> None:
        """A client message was accepted or refused at the door."""

    def redelivered(self, listener: str) -> None:
        """A hop of ``listener`` was claimed from a silent daemon to be handled again (at-least-once)."""

    def dead_lettered(self, listener: str) -> None:
        """A hop of ``listener`` failed its last delivery and went to the dead-letter stream."""

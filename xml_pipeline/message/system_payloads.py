"""Payloads the pump itself sends: errors, and "I did not understand".

The Python class is ``SystemErrorPayload`` so that importing it never shadows
the built-in ``SystemError``; on the wire its element is ``<SystemError>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.Enum):
    """Why a message failed. Stable strings: clients may switch on them."""

    MALFORMED_XML = "malformed-xml"
    FORBIDDEN_DTD = "forbidden-dtd"
    UNSUPPORTED_ENCODING = "unsupported-encoding"
    TOO_LARGE = "too-large"
    BODY_TIMEOUT = "body-timeout"
    TOO_DEEP = "too-deep"
    ENVELOPE_INVALID = "envelope-invalid"
    UNKNOWN_TARGET = "unknown-target"
    PEER_NOT_ALLOWED = "peer-not-allowed"
    SENDER_FORBIDDEN = "sender-forbidden"
    TARGET_FORBIDDEN = "target-forbidden"
    PAYLOAD_INVALID = "payload-invalid"
    HANDLER_ERROR = "handler-error"
    HANDLER_TIMEOUT = "handler-timeout"
    BAD_RESPONSE = "bad-response"
    OVERLOAD = "overload"
    HISTORY_FULL = "history-full"
    SHUTTING_DOWN = "shutting-down"
    BACKEND_UNAVAILABLE = "backend-unavailable"
    BACKEND_UNCERTAIN = "backend-uncertain"
    WORKER_CRASH = "worker-crash"
    CRASH_LOOP = "crash-loop"
    DEAD_LETTER = "dead-letter"
    INTERNAL = "internal"

    @property
    def retry_allowed(self) -> bool:
        """Whether sending the same message again may succeed."""
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {
        ErrorCode.HANDLER_TIMEOUT,
        ErrorCode.BODY_TIMEOUT,
        ErrorCode.OVERLOAD,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.WORKER_CRASH,
    }
)


@dataclass(frozen=True, slots=True)
class SystemErrorPayload:
    """Delivered to the sender of a message that failed, on the message's thread."""

    __xml_name__ = "SystemError"

    code: ErrorCode
    message: str
    retry_allowed: bool = False
    listener: str = ""


@dataclass(frozen=True, slots=True)
class Huh:
    """A listener's polite "I did not understand that" reply."""

    __xml_name__ = "huh"

    message: str
    original: str = ""

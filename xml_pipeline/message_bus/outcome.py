"""What a step of the pipeline says when a message cannot go on: a Failure, or a client's Refusal."""

from __future__ import annotations

from dataclasses import dataclass

from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a message failed inside the organism; becomes a SystemError to whoever should hear it."""

    code: ErrorCode
    detail: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client's message was not accepted, and whom to tell."""

    code: ErrorCode
    detail: str
    sender: str | None = None
    thread: str | None = None
    target: str | None = None


def error_payload(failure: Failure, listener: str) -> SystemErrorPayload:
    return SystemErrorPayload(
        code=failure.code, message=failure.detail, retry_allowed=failure.code.retry_allowed, listener=listener
    )

"""cpu_bound handlers that misbehave on purpose; importable by worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from tests.support import Ping, Pong
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.context_buffer import get_context_buffer


async def whoami(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(str(os.getpid())))


async def explode(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    raise ValueError(f"boom in worker {os.getpid()}")


async def gives_up(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    raise TimeoutError("the upstream service did not answer")


async def spin(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Never awaits, never returns: only a signal can stop it."""
    counter = 0
    while True:
        counter += 1


async def nap(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    await asyncio.sleep(3600)
    return HandlerResponse.respond(Pong("late"))


async def pid_then_nap(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Tells the test which process runs it (in the file named by ``text``), then waits to be killed."""
    Path(payload.text).write_text(str(os.getpid()))  # noqa: ASYNC240 - a few bytes, once
    await asyncio.sleep(3600)
    return HandlerResponse.respond(Pong("survived"))


async def wrong_type(payload: Ping, metadata: HandlerMetadata) -> object:
    return 42


async def writes_history(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Reads the conversation's history in the worker and answers with what it saw."""
    history = get_context_buffer().get_thread(metadata.conversation_id)
    return HandlerResponse.respond(Pong("|".join(f"{slot.from_id}>{slot.to_id}" for slot in history)))


async def busy(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """A quarter of a second of blocking work, well within its listener's timeout."""
    time.sleep(0.25)  # noqa: ASYNC251 - blocking is the point: this stands for CPU work
    return HandlerResponse.respond(Pong(payload.text))


async def notes_then_dies(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Appends ``text`` to the file its first field names, then ends its worker process.

    ``text`` is ``file|how|tag``: ``how`` is ``exit`` (os._exit) or ``kill`` (SIGKILL to itself); the
    file counts the runs, one line each, whichever worker ran them.
    """
    log, how, _ = payload.text.split("|")
    with open(log, "a") as runs:  # noqa: ASYNC230 - one line, and the process ends right after
        runs.write(payload.text + "\n")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


async def works_a_while(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """0.1 to 0.3 s of blocking work (``text`` is a number), so that calls overlap in the workers."""
    time.sleep(0.1 + int(payload.text) % 3 * 0.1)  # noqa: ASYNC251 - blocking is the point: this stands for CPU work
    return HandlerResponse.respond(Pong(payload.text))


async def pid_then_wait_for_release(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Writes its pid to ``<dir>/<name>.pid`` (``text`` is ``dir|name``), then waits for ``<dir>/release``."""
    directory, name = payload.text.split("|")
    Path(directory, f"{name}.pid").write_text(str(os.getpid()))  # noqa: ASYNC240 - a few bytes, once
    release = Path(directory, "release")
    async with asyncio.timeout(30):
        while not release.exists():  # noqa: ASYNC110, ASYNC240 - another process creates it: nothing to await
            await asyncio.sleep(0.01)
    return HandlerResponse.respond(Pong(str(os.getpid())))


async def stuck_beyond_signals(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Writes its pid to ``<dir>/<name>.pid`` (``text`` is ``dir|name``), then blocks the worker's
    timeout signal and never returns: only the pool killing the process ends it."""
    directory, name = payload.text.split("|")
    Path(directory, f"{name}.pid").write_text(str(os.getpid()))  # noqa: ASYNC240 - a few bytes, once
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)  # noqa: ASYNC251 - blocking is the point
    return HandlerResponse.respond(Pong("unstuck"))


async def notes(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Appends its tag to a file (``text`` is ``file|tag``) and answers with the tag: a run leaves a line."""
    log, tag = payload.text.split("|")
    with open(log, "a") as runs:  # noqa: ASYNC230 - one line
        runs.write(tag + "\n")
    return HandlerResponse.respond(Pong(tag))

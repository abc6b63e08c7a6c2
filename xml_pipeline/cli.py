"""The ``xml-pipeline`` command."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

import click

from xml_pipeline import __version__
from xml_pipeline.config.loader import ConfigError, load_organism
from xml_pipeline.logs import configure_logging
from xml_pipeline.message.envelope import serialize_envelope
from xml_pipeline.message.safe_xml import XmlRejected, parse_untrusted
from xml_pipeline.message_bus.conversations import NoMoreReplies, Submission
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.message_bus.thread_registry import new_thread_id
from xml_pipeline.organism import Organism
from xml_pipeline.runtime import run as run_on_uvloop

DEFAULT_ORGANISM = "organism.yaml"
EXIT_CONFIG = 2


def _load_or_exit(path: str) -> Organism:
    try:
        return load_organism(path)
    except ConfigError as exc:
        click.echo(f"{path}: {len(exc.problems)} problem(s):", err=True)
        for problem in exc.problems:
            click.echo("  " + problem.render(path), err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xml-pipeline")
def main() -> None:
    """Run an organism: listeners that exchange validated XML messages.

    Start with `xml-pipeline check organism.yaml`, then
    `xml-pipeline run organism.yaml --stdin` and type a message such as

        greeter <Greeting><name>Ada</name></Greeting>
    """


@main.command()
@click.argument("organism", default=DEFAULT_ORGANISM, type=click.Path(dir_okay=False))
def check(organism: str) -> None:
    """Validate ORGANISM (default: organism.yaml) without starting anything.

    Exits 0 when it is valid, 2 with every problem listed when it is not.
    """
    loaded = _load_or_exit(organism)
    click.echo(f"{organism}: organism '{loaded.name}' is valid ({len(loaded.listeners)} listeners)")


@main.command()
@click.argument("organism", default=DEFAULT_ORGANISM, type=click.Path(dir_okay=False))
@click.option(
    "--stdin", "use_stdin", is_flag=True, help="Read messages from standard input, print replies, stop at end of input."
)
@click.option(
    "--sender", default="console", show_default=True, help="Sender name for shorthand messages read with --stdin."
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Overrides organism.log_level."
)
@click.option("--log-json", is_flag=True, help="Log JSON objects, one per line.")
@click.option(
    "--drain-timeout", default=10.0, show_default=True, help="Seconds to let in-flight work finish when stopping."
)
def run(
    organism: str, use_stdin: bool, sender: str, log_level: str | None, log_json: bool, drain_timeout: float
) -> None:
    """Run ORGANISM (default: organism.yaml) in the foreground until SIGTERM or SIGINT.

    With --stdin, each input line is either a whole envelope or the shorthand
    `TARGET <Payload>...</Payload>`; replies are printed as envelopes, one per line.
    """
    loaded = _load_or_exit(organism)
    configure_logging(log_level or str(loaded.settings.get("log_level", "info")), as_json=log_json)
    sys.exit(run_on_uvloop(_serve(loaded, use_stdin, sender, drain_timeout)))


async def _serve(organism: Organism, use_stdin: bool, sender: str, drain_timeout: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pump = Pump(organism)
    await pump.start()
    try:
        if use_stdin:
            reading = asyncio.create_task(_read_stdin(pump, sender))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reading, stopping):
                task.cancel()
            await asyncio.gather(reading, stopping, return_exceptions=True)
            if reading.done() and not reading.cancelled() and reading.exception() is not None:
                raise reading.exception()  # type: ignore[misc]
        else:
            await stop.wait()
    finally:
        await pump.stop(drain_timeout)
    return 0


def _envelope_from_line(line: str, sender: str) -> bytes:
    """A whole envelope as is, or ``TARGET <Payload/>`` wrapped in one."""
    text = line.strip()
    if text.startswith("<"):
        return text.encode()
    target, _, payload = text.partition(" ")
    try:
        element = parse_untrusted(payload.strip().encode())
    except XmlRejected:
        return payload.encode()  # the pump answers it with the precise SystemError
    return serialize_envelope(sender, target, new_thread_id(), element)


async def _read_stdin(pump: Pump, sender: str) -> None:
    lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)
    loop = asyncio.get_running_loop()

    def pump_lines() -> None:  # a daemon thread: blocking reads must not hold up shutdown
        for raw in sys.stdin:
            asyncio.run_coroutine_threadsafe(lines.put(raw), loop).result()
        asyncio.run_coroutine_threadsafe(lines.put(None), loop).result()

    threading.Thread(target=pump_lines, name="stdin-reader", daemon=True).start()
    async with asyncio.TaskGroup() as group:
        while (line := await lines.get()) is not None:
            if line.strip():
                submission = await pump.inject(_envelope_from_line(line, sender))
                group.create_task(_print_replies(submission))


async def _print_replies(submission: Submission, timeout: float = 60.0) -> None:
    try:
        while True:
            reply = await submission.next_reply(timeout)
            click.echo(reply.envelope.decode())
    except NoMoreReplies:
        return
    except TimeoutError:
        click.echo(f"# no reply on thread {submission.thread_id} within {timeout:g}s", err=True)

"""The ``xml-pipeline`` command.

Exit codes, for scripts: 0 success; 1 the daemon or a reply reported an error;
2 bad usage or an invalid organism.yaml; 3 timed out waiting for replies;
4 no daemon answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

import click
from redis.exceptions import RedisError

from xml_pipeline import __version__
from xml_pipeline.cli_tokens import token
from xml_pipeline.cluster.dead_letters import DeadLetters
from xml_pipeline.config.loader import ConfigError, load_organism, parse_tcp_address, read_organism_section
from xml_pipeline.daemon.client import DaemonClient, DaemonUnreachable, DoorRefused, Response
from xml_pipeline.daemon.paths import default_socket_path
from xml_pipeline.daemon.service import Daemon, DaemonOptions, DaemonStartError
from xml_pipeline.logs import configure_logging
from xml_pipeline.memory.factory import open_backend
from xml_pipeline.memory.shared_backend import BackendConfig, BackendUnavailable
from xml_pipeline.message.envelope import LISTENER_NAME, THREAD_ID, serialize_envelope
from xml_pipeline.message.safe_xml import XmlRejected, parse_untrusted
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.conversations import NoMoreReplies, Submission
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.message_bus.thread_registry import new_thread_id
from xml_pipeline.observe.trace import render as render_trace
from xml_pipeline.organism import Organism
from xml_pipeline.runtime import run as run_on_uvloop

DEFAULT_ORGANISM = "organism.yaml"
EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4

organism_argument = click.argument("organism", default=DEFAULT_ORGANISM, type=click.Path(dir_okay=False))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"xml-pipeline: {message}", err=True)
    sys.exit(code)


def _load_or_exit(path: str) -> Organism:
    try:
        return load_organism(path)
    except ConfigError as exc:
        click.echo(f"{path}: {len(exc.problems)} problem(s):", err=True)
        for problem in exc.problems:
            click.echo("  " + problem.render(path), err=True)
        sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xml-pipeline")
def main() -> None:
    """Run an organism: listeners that exchange validated XML messages.

    \b
    Getting started, from the directory holding organism.yaml:
      xml-pipeline check                 validate organism.yaml
      xml-pipeline run                   start the daemon (Ctrl-C stops it)
      xml-pipeline send greeter '<Greeting><name>Ada</name></Greeting>'
      xml-pipeline status                what the daemon is doing

    Every command takes --help.
    """


@main.command()
@organism_argument
def check(organism: str) -> None:
    """Validate ORGANISM (default: organism.yaml) without starting anything.

    Exits 0 when it is valid, 2 with every problem listed when it is not.
    """
    loaded = _load_or_exit(organism)
    open_to_clients = sum(1 for listener in loaded.listeners.values() if listener.ingress)
    click.echo(
        f"{organism}: organism '{loaded.name}' is valid ({len(loaded.listeners)} listeners,"
        f" {open_to_clients} open to clients)"
    )
    if not open_to_clients:
        click.echo(f"{organism}: note: no listener says 'ingress: true', so clients cannot call any", err=True)


@main.command()
@organism_argument
@click.option(
    "--socket", "socket_path", help="Unix socket to listen on (default: organism.socket, else the runtime directory)."
)
@click.option("--tcp", help="Also listen on HOST:PORT (default: organism.tcp); beyond loopback only with tls and auth.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Overrides organism.log_level."
)
@click.option("--log-json", is_flag=True, help="Log JSON objects, one per line.")
@click.option("--drain-timeout", type=float, help="Seconds to let in-flight work finish when stopping (default 20).")
@click.option(
    "--stdin",
    "use_stdin",
    is_flag=True,
    help="No sockets: read messages from standard input, print replies, stop at end of input.",
)
@click.option("--sender", default="console", show_default=True, help="With --stdin: sender of shorthand messages.")
@click.option(
    "--listeners",
    "serve",
    help="With delivery at-least-once: handle only these listeners (comma-separated listener names).",
)
def run(
    organism: str,
    socket_path: str | None,
    tcp: str | None,
    log_level: str | None,
    log_json: bool,
    drain_timeout: float | None,
    use_stdin: bool,
    sender: str,
    serve: str | None,
) -> None:
    """Run ORGANISM (default: organism.yaml) in the foreground: the systemd entry point.

    \b
    Serves HTTP on a Unix socket (and optionally loopback TCP):
      SIGTERM, SIGINT  stop accepting, drain in-flight work, exit 0
      SIGHUP           re-read ORGANISM; if it is invalid, keep running the old one
    Logs go to stderr, one line per event.

    With --stdin, each input line is a whole envelope or the shorthand
    `TARGET <Payload>...</Payload>`; replies are printed as envelopes, one per line.
    """
    loaded = _load_or_exit(organism)
    as_json = log_json or loaded.settings.get("log_format") == "json"
    configure_logging(log_level or str(loaded.settings.get("log_level", "info")), as_json=as_json)
    if use_stdin:
        sys.exit(run_on_uvloop(_serve_stdin(loaded, sender, drain_timeout or 10.0)))
    try:
        options = DaemonOptions.for_organism(loaded, socket_path=socket_path, tcp=tcp, drain_timeout=drain_timeout)
    except ValueError as exc:
        _fail(f"--tcp: {exc}", EXIT_USAGE)
    try:
        served = frozenset(name.strip() for name in serve.split(",") if name.strip()) if serve else None
        sys.exit(run_on_uvloop(_run_daemon(loaded, Path(organism), options, served)))
    except DaemonStartError as exc:
        _fail(str(exc), EXIT_ERROR_REPLY)


async def _run_daemon(organism: Organism, path: Path, options: DaemonOptions, serve: frozenset[str] | None) -> int:
    try:
        backend = open_backend(organism.settings.get("backend", {}))
    except BackendUnavailable as exc:
        raise DaemonStartError(f"the backend is unavailable: {exc}") from None
    try:
        daemon = Daemon(organism, path, options, backend, serve=serve)
    except DaemonStartError:
        backend.close()
        raise
    return await daemon.run()


def _client_for(
    organism: str, socket_path: str | None, tcp: str | None, token: str | None = None, tls_ca: str | None = None
) -> DaemonClient:
    if tls_ca and not tcp:
        _fail("--tls-ca goes with --tcp: the Unix socket does not speak TLS", EXIT_USAGE)
    if socket_path:
        return DaemonClient(socket_path=Path(socket_path), token=token)
    if tcp:
        try:
            return DaemonClient(tcp=parse_tcp_address(tcp), token=token, tls_ca=Path(tls_ca) if tls_ca else None)
        except ValueError as exc:
            _fail(f"--tcp {exc}", EXIT_USAGE)
        except OSError as exc:
            _fail(f"--tls-ca {tls_ca}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        section = read_organism_section(organism)
    except ConfigError as exc:
        _fail(f"{exc} (give --socket or --tcp, or the daemon's organism.yaml with -o)", EXIT_USAGE)
    configured = section.get("socket")
    if isinstance(configured, str):
        path = Path(configured)
        return DaemonClient(socket_path=path if path.is_absolute() else Path(section["base_dir"]) / path, token=token)
    return DaemonClient(socket_path=default_socket_path(section["name"]), token=token)


daemon_address_options = [
    click.option(
        "-o",
        "--organism",
        default=DEFAULT_ORGANISM,
        show_default=True,
        help="The daemon's organism.yaml, to find its socket.",
    ),
    click.option("--socket", "socket_path", help="The daemon's Unix socket."),
    click.option("--tcp", help="The daemon's HOST:PORT."),
    click.option(
        "--token",
        envvar="XML_PIPELINE_TOKEN",
        help="Bearer token for a daemon with auth (default: $XML_PIPELINE_TOKEN).",
    ),
    click.option(
        "--tls-ca",
        envvar="XML_PIPELINE_TLS_CA",
        type=click.Path(dir_okay=False),
        help="With --tcp: speak TLS, trusting the daemon's certificate if this CA signed it.",
    ),
]


def _with_daemon_address(command: Any) -> Any:
    for option in reversed(daemon_address_options):
        command = option(command)
    return command


@main.command()
@click.argument("target", required=False)
@click.argument("payload", required=False)
@click.option(
    "--envelope", "envelope_file", type=click.File("rb"), help="Send this whole envelope file as is ('-' for stdin)."
)
@click.option("--sender", default="console", show_default=True, help="Who the message is from.")
@click.option("--thread", help="Continue this conversation (the thread printed by an earlier send).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for replies.")
@click.option(
    "--first", is_flag=True, help="Return after the first reply instead of waiting for the conversation to end."
)
@_with_daemon_address
def send(
    target: str | None,
    payload: str | None,
    envelope_file: Any,
    sender: str,
    thread: str | None,
    timeout: float,
    first: bool,
    organism: str,
    socket_path: str | None,
    tcp: str | None,
    token: str | None,
    tls_ca: str | None,
) -> None:
    """Send a message to the running daemon and print the replies.

    \b
    xml-pipeline send greeter '<Greeting><name>Ada</name></Greeting>'
    echo '<Greeting><name>Ada</name></Greeting>' | xml-pipeline send greeter
    xml-pipeline send --envelope message.xml

    Each reply is printed as an envelope on its own line; the thread goes to
    stderr. Exits 1 if a reply is a SystemError, 3 on timeout, 4 if no daemon answers.
    """
    envelope = _envelope_to_send(target, payload, envelope_file, sender, thread)
    client = _client_for(organism, socket_path, tcp, token, tls_ca)
    status, body = _sent(client, envelope, "first" if first else "end", timeout)
    for reply in body.get("replies", []):
        click.echo(reply)
    if not body.get("accepted", False):
        _fail(_refusal_line(status, body.get("error")), EXIT_ERROR_REPLY)
    replies = body.get("replies", [])
    click.echo(f"thread {body['thread']}: {len(replies)} repl{'y' if len(replies) == 1 else 'ies'}", err=True)
    if any("<SystemError>" in reply for reply in replies):
        sys.exit(EXIT_ERROR_REPLY)
    if (first and not replies) or (not first and not body.get("ended")):
        _fail(f"no {'reply' if first else 'end of the conversation'} within {timeout:g}s", EXIT_TIMEOUT)


def _sent(client: DaemonClient, envelope: bytes, wait: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """Store the message, then wait for its replies: the HTTP status and JSON, shaped as ``POST ?wait=`` gives it.

    Two requests, so that the thread is known before the wait: a daemon that
    dies during the wait leaves a client that can say where the replies are
    (with ``delivery: at-least-once``, any other daemon of the organism has them).
    """
    with _reaching_daemon():
        answer = client.send(envelope, wait="none", timeout=timeout)
    stored = _json_of(answer)
    if not stored.get("accepted", False):
        return answer.status, stored
    thread = str(stored["thread"])
    try:
        answer = client.replies(thread, wait=wait, timeout=timeout)
    except DaemonUnreachable as exc:
        _fail(
            f"{exc}; the message was accepted on thread {thread}: collect its replies with"
            f" GET /threads/{thread}/replies (from another daemon of the organism with delivery at-least-once)",
            EXIT_UNREACHABLE,
        )
    except DoorRefused as exc:
        _fail(f"{exc} (the message was accepted on thread {thread})", EXIT_ERROR_REPLY)
    if answer.status != 200:
        problem = _json_of(answer).get("error")
        _fail(f"the message was accepted on thread {thread}, but its replies: {problem}", EXIT_ERROR_REPLY)
    return answer.status, {"accepted": True, **_json_of(answer)}


@contextlib.contextmanager
def _reaching_daemon() -> Iterator[None]:
    """A call to the daemon: no daemon there, or a refusal at its door, ends the command plainly."""
    try:
        yield
    except DaemonUnreachable as exc:
        _fail(f"{exc}; is it running? (xml-pipeline run)", EXIT_UNREACHABLE)
    except DoorRefused as exc:
        _fail(str(exc), EXIT_ERROR_REPLY)


def _json_of(answer: Response) -> dict[str, Any]:
    try:
        return dict(answer.json())
    except ValueError:
        _fail(f"the daemon answered HTTP {answer.status}: {answer.body[:200]!r}", EXIT_ERROR_REPLY)


def _refusal_line(status: int, error: Any) -> str:
    """The daemon's refusal in one line: a SystemError's code and message, or its plain ``error`` text."""
    if isinstance(error, dict):
        return f"refused ({error.get('code', status)}): {error.get('message', '')}"
    return f"refused (HTTP {status}): {error if error is not None else 'no reason given'}"


def _envelope_to_send(
    target: str | None, payload: str | None, envelope_file: Any, sender: str, thread: str | None
) -> bytes:
    if envelope_file is not None:
        if target or payload:
            _fail("give either --envelope or TARGET [PAYLOAD], not both", EXIT_USAGE)
        raw = envelope_file.read()
        try:
            parse_untrusted(raw)
        except XmlRejected as exc:
            _fail(f"the envelope is not usable XML: {exc.detail}", EXIT_USAGE)
        return bytes(raw)
    if not target:
        _fail("say which listener to send to: xml-pipeline send TARGET PAYLOAD", EXIT_USAGE)
    if not LISTENER_NAME.match(target):
        _fail(f"{target!r} is not a listener name", EXIT_USAGE)
    if thread is not None and not THREAD_ID.match(thread):
        _fail(f"--thread {thread!r} is not a thread id (a UUID)", EXIT_USAGE)
    if not LISTENER_NAME.match(sender):
        _fail(f"--sender {sender!r} is not a valid name", EXIT_USAGE)
    text = payload if payload is not None else sys.stdin.read()
    try:
        element = parse_untrusted(text.strip().encode())
    except XmlRejected as exc:
        _fail(f"PAYLOAD is not usable XML: {exc.detail}", EXIT_USAGE)
    return serialize_envelope(sender, target, thread or new_thread_id(), element)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@_with_daemon_address
def status(
    as_json: bool, organism: str, socket_path: str | None, tcp: str | None, token: str | None, tls_ca: str | None
) -> None:
    """Show what the running daemon is doing: listeners, queue, in-flight work, threads, uptime."""
    client = _client_for(organism, socket_path, tcp, token, tls_ca)
    with _reaching_daemon():
        data = client.status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    state = "accepting messages" if data["accepting"] else "stopping"
    uptime = _duration(data["uptime_seconds"])
    click.echo(f"organism {data['organism']}: {state}, pid {data['pid']}, up {uptime}, version {data['version']}")
    click.echo(f"listening on {data['socket']}" + (f" and {data['tcp']}" if data["tcp"] else ""))
    click.echo(
        f"queue {data['queue_depth']}  in flight {data['in_flight']}  conversations {data['conversations']}"
        f"  threads {data['threads']}  uncollected replies {data['uncollected_replies']}"
    )
    click.echo("listeners:")
    for listener in data["listeners"]:
        peers = "anyone" if listener["peers"] is None else (", ".join(listener["peers"]) or "no one (responds only)")
        door = "open to clients" if listener["ingress"] else "internal"
        click.echo(
            f"  {listener['name']:<20} {door}; accepts {', '.join(listener['accepts'])}; may call {peers};"
            f" timeout {listener['timeout_seconds']:g}s, concurrency {listener['max_concurrency']}"
        )
    cluster = data.get("cluster")
    if cluster is not None:
        _echo_cluster(cluster)


def _echo_cluster(cluster: dict[str, Any]) -> None:
    """The durable mode's part of ``status``: every live daemon, each listener's backlog, dead letters."""
    click.echo(
        f"cluster: {len(cluster['daemons'])} live daemon(s); dead letters {cluster['dead_letters']};"
        f" redeliveries by this daemon {cluster['redeliveries']}"
    )
    for daemon in cluster["daemons"]:
        mark = " (this one)" if daemon.get("daemon") == cluster["daemon"] else ""
        click.echo(
            f"  {daemon.get('daemon')}{mark}: pid {daemon.get('pid')} on {daemon.get('host')},"
            f" serving {', '.join(daemon.get('serving', []))}; in flight {daemon.get('in_flight')},"
            f" redeliveries {daemon.get('redeliveries')}, dead letters {daemon.get('dead_letters')}"
        )
    for name, backlog in cluster["listeners"].items():
        click.echo(f"  {name:<20} stored {backlog['stored']}, being handled {backlog['in_flight']}")


@main.command()
@click.argument("thread")
@click.option("--xml", "with_xml", is_flag=True, help="Show each hop's payload.")
@click.option("--json", "as_json", is_flag=True, help="Print the trace as JSON, for tools.")
@_with_daemon_address
def trace(
    thread: str,
    with_xml: bool,
    as_json: bool,
    organism: str,
    socket_path: str | None,
    tcp: str | None,
    token: str | None,
    tls_ca: str | None,
) -> None:
    """Show conversation THREAD (as `send` prints it) as a call tree: each hop with from, to,
    payload type, time, handler latency and outcome.

    Works while the conversation runs and for observe.trace_retention_seconds after it
    ended; on Redis, any daemon of the organism answers. Exits 1 if no trace is kept.
    """
    if not THREAD_ID.match(thread):
        _fail(f"{thread!r} is not a thread id (a UUID)", EXIT_USAGE)
    client = _client_for(organism, socket_path, tcp, token, tls_ca)
    with _reaching_daemon():
        answer = client.trace(thread, with_xml=with_xml)
    body = answer.json()
    if answer.status != 200:
        _fail(str(body.get("error")), EXIT_ERROR_REPLY)
    if as_json:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    for line in render_trace(body, with_xml=with_xml):
        click.echo(line)


@main.command()
@click.option("--listener", help="Only messages to or from this listener, and its errors.")
@click.option("--errors", "errors_only", is_flag=True, help="Only errors.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for tools.")
@_with_daemon_address
def tail(
    listener: str | None,
    errors_only: bool,
    as_json: bool,
    organism: str,
    socket_path: str | None,
    tcp: str | None,
    token: str | None,
    tls_ca: str | None,
) -> None:
    """Print messages as they flow through the running daemon, until Ctrl-C.

    The daemon never waits for a watcher: one that falls behind loses events,
    and is told how many (a `dropped` line).
    """
    filters = {"listener": listener, "errors": "1" if errors_only else None}
    query = urlencode({key: value for key, value in filters.items() if value})
    client = _client_for(organism, socket_path, tcp, token, tls_ca)
    try:
        with _reaching_daemon():
            for event in _server_sent_events(client.stream(f"/events?{query}", timeout=TAIL_READ_SECONDS)):
                click.echo(json.dumps(event, ensure_ascii=False) if as_json else _tail_line(event))
    except TimeoutError:
        _fail(f"the daemon sent nothing for {TAIL_READ_SECONDS:g}s, not even a keep-alive", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return


TAIL_READ_SECONDS = 60.0
"""Four keep-alives' worth: a daemon silent for this long is gone."""


def _server_sent_events(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The events of a ``text/event-stream``: each data object, a ``dropped`` one marked ``kind: dropped``."""
    name = ""
    for line in lines:
        text = line.decode().rstrip("\r\n")
        if text.startswith("event: "):
            name = text[len("event: ") :]
        elif text.startswith("data: "):
            data = json.loads(text[len("data: ") :])
            yield {"kind": name, **data} if name else data
        elif not text:
            name = ""


def _tail_line(event: dict[str, Any]) -> str:
    if event["kind"] == "dropped":
        return f"... {event['dropped']} event(s) dropped: this watcher fell behind"
    clock = time.strftime("%H:%M:%S", time.localtime(event["at"])) + f".{int(event['at'] * 1000) % 1000:03d}"
    where = f"conversation {event['conversation']}"
    if event["kind"] == "error":
        return f"{clock}  ! {event['code']} at {event['listener'] or '-'}: {event['detail']}  {where}"
    return f"{clock}  {event['from']} → {event['to']}  {event['type'].rpartition(':')[2]}  {where}"


main.add_command(token)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# ---------------------------------------------------------------------- dead letters
@main.group()
def dlq() -> None:
    """Dead letters of a delivery at-least-once organism: hops that failed max_deliveries times."""


_organism_option = click.option(
    "-o", "--organism", default=DEFAULT_ORGANISM, show_default=True, help="The organism.yaml naming the Redis."
)


@contextlib.contextmanager
def _dead_letters(organism: str) -> Iterator[DeadLetters]:
    """The organism's dead letters, closed afterwards; Redis failing on the way exits 4 with the reason."""
    backend = _load_or_exit(organism).settings.get("backend", {})
    if backend.get("delivery") != "at-least-once":
        _fail(f"{organism}: dead letters exist only with backend.delivery at-least-once", EXIT_USAGE)
    config = BackendConfig.from_settings(backend)
    letters = DeadLetters(config.redis_url, config.redis_prefix)
    try:
        yield letters
    except RedisError as exc:
        _fail(f"redis: {exc}", EXIT_UNREACHABLE)
    finally:
        letters.close()


@dlq.command("list")
@_organism_option
@click.option("--count", default=100, show_default=True, help="List at most this many, oldest first.")
def dlq_list(organism: str, count: int) -> None:
    """List dead letters: id, listener, deliveries, conversation, sender and payload."""
    with _dead_letters(organism) as letters:
        for letter in letters.list(count):
            failed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.failed_at))
            hop = letter.hop
            click.echo(
                f"{letter.entry_id}  {letter.listener}  deliveries {letter.deliveries}  failed {failed}"
                f"  conversation {hop.conversation}  from {hop.sender}  {hop.payload_xml.decode()[:200]}"
            )


@dlq.command("replay")
@click.argument("entry_id")
@_organism_option
def dlq_replay(entry_id: str, organism: str) -> None:
    """Put dead letter ENTRY_ID back in its listener's stream, to be handled again."""
    with _dead_letters(organism) as letters:
        new_id = letters.replay(entry_id)
    if new_id is None:
        _fail(f"no dead letter {entry_id}", EXIT_ERROR_REPLY)
    click.echo(f"replayed {entry_id} as {new_id}")


@dlq.command("purge")
@_organism_option
def dlq_purge(organism: str) -> None:
    """Delete every dead letter."""
    with _dead_letters(organism) as letters:
        click.echo(f"purged {letters.purge()} dead letter(s)")


# ---------------------------------------------------------------------- --stdin mode
async def _serve_stdin(organism: Organism, sender: str, drain_timeout: float) -> int:
    """Exit code: 1 if any line got a SystemError (refused or failed), else 3 if any timed out, else 0.

    The same codes ``send`` uses, so a script can tell a clean run from one
    whose input was partly refused.
    """
    outcomes = _StdinOutcomes()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pump = Pump(organism)
    await pump.start()
    try:
        reading = asyncio.create_task(_read_stdin(pump, sender, outcomes))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reading, stopping):
            task.cancel()
        await asyncio.gather(reading, stopping, return_exceptions=True)
        if reading.done() and not reading.cancelled() and (error := reading.exception()) is not None:
            raise error
    finally:
        await pump.stop(drain_timeout)
    if outcomes.errors:
        click.echo(f"# {outcomes.errors} message(s) got a SystemError", err=True)
        return EXIT_ERROR_REPLY
    return EXIT_TIMEOUT if outcomes.timeouts else EXIT_OK


@dataclass
class _StdinOutcomes:
    errors: int = 0
    timeouts: int = 0


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


async def _read_stdin(pump: Pump, sender: str, outcomes: _StdinOutcomes) -> None:
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
                submission = await pump.inject(_envelope_from_line(line, sender), access=ClientAccess.anonymous())
                group.create_task(_print_replies(submission, outcomes))


async def _print_replies(submission: Submission, outcomes: _StdinOutcomes, timeout: float = 60.0) -> None:
    started = time.monotonic()
    try:
        while True:
            reply = await submission.next_reply(timeout - (time.monotonic() - started))
            click.echo(reply.envelope.decode())
            if reply.is_error:
                outcomes.errors += 1
    except NoMoreReplies:
        return
    except TimeoutError:
        outcomes.timeouts += 1
        click.echo(f"# no reply on thread {submission.thread_id} within {timeout:g}s", err=True)

"""organism.yaml -> Organism, reporting every problem at once with its line.

The file is composed into YAML nodes (not plain dicts) so each value keeps the
line it came from. Validation runs in two passes: the shape of the document
(unknown keys, missing keys, wrong types, bad values) and then what the values
name (imports, async handlers, peers, duplicate names). Both passes collect
problems instead of stopping at the first, because an operator editing the
file wants the whole list in one go.

The directory holding organism.yaml is put first on ``sys.path`` so that
handler modules next to it (``workers.hello``) import as written.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
import reprlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xml_pipeline.daemon.tls import TlsSetupError, exposure_problem, server_context
from xml_pipeline.daemon.tokens import TokenBook, TokenFileError
from xml_pipeline.imports import import_object
from xml_pipeline.memory.shared_backend import BACKEND_TYPES
from xml_pipeline.message.envelope import LISTENER_NAME
from xml_pipeline.message.payload_codec import PayloadTypeError, codec_for
from xml_pipeline.organism import Listener, Organism, PumpLimits, is_reserved

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None
    message: str

    def render(self, path: str) -> str:
        return f"{path}:{self.line}: {self.message}" if self.line else f"{path}: {self.message}"


class ConfigError(Exception):
    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.message))
        super().__init__("\n".join(problem.render(path) for problem in self.problems))


Check = Callable[[Any], "str | None"]
_Entries = dict[str, tuple[yaml.Node, yaml.Node]]


@dataclass(frozen=True, slots=True)
class _Key:
    kind: type | tuple[type, ...]
    required: bool = False
    check: Check | None = None
    what: str = ""


QUOTE_LIMIT = 120
"""Most characters of a value a problem quotes: it names the value, it does not reprint it."""
_QUOTER = reprlib.Repr()
_QUOTER.maxlevel = 3
_QUOTER.maxlist = _QUOTER.maxtuple = _QUOTER.maxdict = _QUOTER.maxset = 10
_QUOTER.maxstring = _QUOTER.maxlong = _QUOTER.maxother = 2 * QUOTE_LIMIT


def _quote(value: Any) -> str:
    """``value``'s repr, cut to ``QUOTE_LIMIT`` characters with "…".

    ``reprlib`` stops at a few items per level, so quoting a huge nested value
    costs no more than quoting a small one.
    """
    text = _QUOTER.repr(value[:QUOTE_LIMIT] if isinstance(value, str) else value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 1] + "…"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(minimum: int) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _between(low: int, high: int) -> Check:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _organism_name(value: Any) -> str | None:
    return None if ORGANISM_NAME.match(value) else "may hold only letters, digits, '_', '-' and '.'"


def parse_tcp_address(value: str) -> tuple[str, int]:
    """``host:port`` with an IP address or ``localhost``; raises ValueError with a plain sentence.

    Whether the daemon may serve there is another question: see ``xml_pipeline.daemon.tls``.
    """
    host, separator, port = value.rpartition(":")
    host = host.strip("[]")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must look like 127.0.0.1:8470")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("must name an IP address (127.0.0.1, ::1, 0.0.0.0...) or localhost") from None
    return host, int(port)


def _tcp_address(value: Any) -> str | None:
    try:
        parse_tcp_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _redis_url(value: Any) -> str | None:
    if value.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return None
    return "must be a redis://, rediss:// (TLS) or unix:// URL"


def _keys_written(node: yaml.Node) -> set[str]:
    """The keys a mapping node names, whether or not their values were good."""
    if not isinstance(node, yaml.MappingNode):
        return set()
    return {key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def _only_for_redis(backend: dict[str, Any]) -> str:
    if backend.get("delivery") == "at-least-once":
        return (
            "delivery at-least-once needs backend.type redis: messages in flight must outlive the daemon, and only"
            " Redis keeps them (memory and manager are single-daemon, at most once)"
        )
    return "redis_url, redis_prefix, redis_ttl, redis_timeout_seconds and delivery only apply to backend.type redis"


def _listener_name(value: Any) -> str | None:
    if not LISTENER_NAME.match(value):
        return "is not a valid listener name (letters, digits, _ and -, parts joined by dots)"
    if is_reserved(value):
        return "starts with 'system', which is reserved for built-in listeners"
    return None


def _otel_installed(value: Any) -> str | None:
    if not value:
        return None
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return "needs OpenTelemetry: pip install 'xml-pipeline[otel]'"
    return None


_NUMBER = (int, float)
DELIVERY_MODES = ("at-most-once", "at-least-once")
ORGANISM_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_SECTIONS: dict[str, dict[str, _Key]] = {
    "organism": {
        "name": _Key(str, required=True, check=_organism_name),
        "socket": _Key(str),
        "tcp": _Key(str, check=_tcp_address),
        "log_level": _Key(str, check=_one_of(LOG_LEVELS)),
        "log_format": _Key(str, check=_one_of(LOG_FORMATS)),
        "drain_timeout_seconds": _Key(_NUMBER, check=_positive),
        "reply_retention_seconds": _Key(_NUMBER, check=_positive),
    },
    "pump": {
        "queue_size": _Key(int, check=_at_least(1)),
        "max_in_flight": _Key(int, check=_at_least(1)),
        "max_message_bytes": _Key(int, check=_at_least(256)),
        "max_depth": _Key(int, check=_between(4, 255)),
        "repair": _Key(bool),
        "enqueue_timeout_seconds": _Key(_NUMBER, check=_positive),
        "mailbox_size": _Key(int, check=_at_least(1)),
        "max_slots_per_thread": _Key(int, check=_at_least(1)),
        "max_conversations": _Key(int, check=_at_least(1)),
        "max_reply_bytes": _Key(int, check=_at_least(1)),
    },
    "backend": {
        "type": _Key(str, check=_one_of(BACKEND_TYPES)),
        "redis_url": _Key(str, check=_redis_url),
        "redis_prefix": _Key(str),
        "redis_ttl": _Key(int, check=_at_least(0)),
        "redis_timeout_seconds": _Key(_NUMBER, check=_positive),
        "delivery": _Key(str, check=_one_of(DELIVERY_MODES)),
        "max_deliveries": _Key(int, check=_at_least(1)),
        "claim_grace_seconds": _Key(_NUMBER, check=_positive),
    },
    "http": {
        "max_connections": _Key(int, check=_at_least(1)),
        "header_timeout_seconds": _Key(_NUMBER, check=_positive),
        "body_timeout_seconds": _Key(_NUMBER, check=_positive),
        "rate_per_second": _Key(_NUMBER, check=_positive),
        "rate_burst": _Key(int, check=_at_least(1)),
    },
    "auth": {
        "tokens_file": _Key(str, required=True),
        "require_on_socket": _Key(bool),
    },
    "tls": {
        "cert": _Key(str, required=True),
        "key": _Key(str, required=True),
        "client_ca": _Key(str),
    },
    "process_pool": {
        "workers": _Key(int, check=_at_least(1)),
        "max_tasks_per_child": _Key(int, check=_at_least(1)),
    },
    "observe": {
        "trace_retention_seconds": _Key(_NUMBER, check=_at_least(0)),
        "trace_max_conversations": _Key(int, check=_at_least(1)),
        "trace_max_bytes": _Key(int, check=_at_least(1024)),
        "tail_buffer": _Key(int, check=_at_least(1)),
        "tail_max_watchers": _Key(int, check=_at_least(1)),
        "opentelemetry": _Key(bool, check=_otel_installed),
    },
}
_LISTENER_KEYS: dict[str, _Key] = {
    "name": _Key(str, required=True, check=_listener_name),
    "payload_class": _Key((str, list), required=True),
    "handler": _Key(str, required=True),
    "description": _Key(str),
    "peers": _Key(list),
    "agent": _Key(bool),
    "ingress": _Key(bool),
    "cpu_bound": _Key(bool),
    "timeout_seconds": _Key(_NUMBER, check=_positive),
    "max_concurrency": _Key(int, check=_at_least(1)),
}
_TOP_LEVEL = {*_SECTIONS, "listeners"}
_TYPE_WORDS = {str: "a string", int: "a whole number", bool: "true or false", list: "a list", dict: "a mapping"}


def _describe(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        if kind == _NUMBER:
            return "a number"
        return " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kind)
    return _TYPE_WORDS.get(kind, kind.__name__)


MAX_EXPANDED_VALUES = 100_000
"""Most values organism.yaml may stand for once its aliases are copied out: far above a real organism's few hundred."""


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` stands for with every alias copied out, counted up to just past the cap.

    Composing keeps an alias as one more reference to its anchor's node, so a
    1 KB file can stand for billions of values (the YAML "billion laughs").
    Each node is sized once, so this costs one pass over the file's own nodes,
    before anything is constructed, checked or quoted. A node that contains
    itself counts as past the cap.
    """
    past_cap = MAX_EXPANDED_VALUES + 1
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = past_cap  # what an alias to a node still being sized (itself) stands for
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total = min(total + size(child), past_cap)
        sizes[id(node)] = total
        return total

    return size(root)


class _Reader:
    """Walks the node tree, turning nodes into values and collecting problems."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(Problem(node.start_mark.line + 1 if node is not None else None, message))

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, where: str) -> _Entries | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{where} must be a mapping of keys to values")
            return None
        entries: _Entries = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                self.problem(key_node, f"{where}: keys must be strings, not {_quote(key)}")
                continue
            if key in entries:
                self.problem(key_node, f"{where}: '{key}' is given twice")
            entries[key] = (key_node, value_node)
        return entries

    def section(self, node: yaml.Node, where: str, keys: dict[str, _Key]) -> tuple[dict[str, Any], _Entries]:
        """Check a mapping against ``keys``; return the values that passed, and every entry."""
        entries = self.mapping(node, where)
        if entries is None:
            return {}, {}
        values: dict[str, Any] = {}
        for key, (key_node, value_node) in entries.items():
            spec = keys.get(key)
            if spec is None:
                self.problem(key_node, f"{where}: unknown key '{key}' (known keys: {', '.join(keys)})")
                continue
            value = self.value(value_node)
            is_bool_for_number = isinstance(value, bool) and spec.kind in (int, _NUMBER)
            if is_bool_for_number or not isinstance(value, spec.kind):
                self.problem(value_node, f"{where}.{key} must be {_describe(spec.kind)}, not {_quote(value)}")
                continue
            message = spec.check(value) if spec.check is not None else None
            if message is not None:
                self.problem(value_node, f"{where}.{key} {message}: {_quote(value)}")
                continue
            values[key] = value
        for key, spec in keys.items():
            if spec.required and key not in entries:
                self.problem(node, f"{where}: '{key}' is missing")
        return values, entries


@dataclass(slots=True)
class _ListenerSpec:
    line: int
    values: dict[str, Any]
    nodes: dict[str, yaml.Node] = field(default_factory=dict)
    named: bool = True
    """False when the name is missing or invalid: checked, but never built."""


def _build_listener(reader: _Reader, spec: _ListenerSpec) -> Listener | None:
    values, nodes = spec.values, spec.nodes
    name = values["name"]
    where = f"listener '{name}'"
    class_paths = values["payload_class"]
    class_paths = [class_paths] if isinstance(class_paths, str) else class_paths
    classes: list[type] = []
    for path in class_paths:
        if not isinstance(path, str):
            reader.problem(
                nodes["payload_class"], f"{where}: payload_class entries must be dotted paths, not {_quote(path)}"
            )
            continue
        try:
            cls = import_object(path)
        except Exception as exc:
            reader.problem(
                nodes["payload_class"], f"{where}: cannot import payload class '{path}': {type(exc).__name__}: {exc}"
            )
            continue
        try:
            codec_for(cls)
        except PayloadTypeError as exc:
            reader.problem(nodes["payload_class"], f"{where}: payload class '{path}' cannot be an XML contract: {exc}")
            continue
        classes.append(cls)
    handler_path = values["handler"]
    handler: Any = None
    try:
        handler = import_object(handler_path)
    except Exception as exc:
        reader.problem(
            nodes["handler"], f"{where}: cannot import handler '{handler_path}': {type(exc).__name__}: {exc}"
        )
    if handler is not None and not inspect.iscoroutinefunction(handler):
        reader.problem(
            nodes["handler"], f"{where}: handler '{handler_path}' is not an async function (write 'async def')"
        )
        handler = None
    if handler is None or len(classes) != len(class_paths) or not spec.named:
        return None
    try:
        return Listener(
            name,
            classes,
            handler,
            description=values.get("description", ""),
            peers=values.get("peers"),
            agent=values.get("agent", False),
            ingress=values.get("ingress", False),
            cpu_bound=values.get("cpu_bound", False),
            timeout_seconds=float(values.get("timeout_seconds", 30.0)),
            max_concurrency=values.get("max_concurrency", 16),
        )
    except (ValueError, TypeError) as exc:
        reader.problem(nodes["name"], f"{where}: {exc}")
        return None


def _read_listeners(reader: _Reader, node: yaml.Node) -> list[_ListenerSpec]:
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "listeners must be a list of listener mappings")
        return []
    specs: list[_ListenerSpec] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(node.value):
        where = f"listeners[{index}]"
        values, entries = reader.section(item, where, _LISTENER_KEYS)
        if not all(key in values for key in ("payload_class", "handler")):
            continue
        name = values.get("name")
        if name is None:  # missing or invalid, already reported; still check the rest
            values["name"] = where
        elif name in seen:
            reader.problem(entries["name"][1], f"listener '{name}' is defined twice (first on line {seen[name]})")
            continue
        else:
            seen[name] = item.start_mark.line + 1
        nodes = {key: value_node for key, (_, value_node) in entries.items()}
        specs.append(_ListenerSpec(item.start_mark.line + 1, values, nodes, named=name is not None))
    if not node.value:
        reader.problem(node, "listeners is empty: an organism needs at least one listener")
    for spec in specs:
        peers = spec.values.get("peers")
        if peers is None:
            continue
        for peer in peers:
            if not isinstance(peer, str) or (peer not in seen and not is_reserved(peer)):
                reader.problem(
                    spec.nodes["peers"],
                    f"listener '{spec.values['name']}': peer {_quote(peer)} is not a listener of this organism",
                )
    return specs


def load_organism_text(text: str, path: str = "organism.yaml", base_dir: Path | None = None) -> Organism:
    """Build an Organism from YAML text; raises ConfigError listing every problem."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(path, [Problem(mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None
        if root is None:
            raise ConfigError(path, [Problem(None, "the file is empty")])
        if _expanded_size(root) > MAX_EXPANDED_VALUES:
            message = (
                f"its aliases (*name) stand for more than {MAX_EXPANDED_VALUES:,} values, or for a value inside"
                " itself; write the values out"
            )
            raise ConfigError(path, [Problem(None, message)])
        reader = _Reader(loader)
        entries = reader.mapping(root, "the file")
        if entries is None:
            raise ConfigError(path, reader.problems)
        for key, (key_node, _) in entries.items():
            if key not in _TOP_LEVEL:
                reader.problem(key_node, f"unknown top-level key '{key}' (known keys: {', '.join(sorted(_TOP_LEVEL))})")
        sections = {
            name: reader.section(entries[name][1], name, keys)[0] if name in entries else {}
            for name, keys in _SECTIONS.items()
        }
        if "organism" not in entries:
            reader.problem(root, "the 'organism' section is missing")
        if "listeners" not in entries:
            reader.problem(root, "the 'listeners' section is missing")
        backend = sections["backend"]
        written = _keys_written(entries["backend"][1]) if "backend" in entries else set()
        if backend.get("type") == "redis" and "redis_url" not in written:  # (a bad one is reported as such)
            reader.problem(
                entries["backend"][1], "backend.type redis needs backend.redis_url, e.g. redis://127.0.0.1:6379/0"
            )
        redis_only = {"redis_url", "redis_prefix", "redis_ttl", "redis_timeout_seconds", "delivery"}
        if backend.get("type") != "redis" and backend.keys() & redis_only:
            reader.problem(entries["backend"][1], _only_for_redis(backend))
        durable_only = backend.keys() & {"max_deliveries", "claim_grace_seconds"}
        if backend.get("delivery", "at-most-once") != "at-least-once" and durable_only:
            verb = "applies" if len(durable_only) == 1 else "apply"
            reader.problem(
                entries["backend"][1], f"{', '.join(sorted(durable_only))} only {verb} to delivery at-least-once"
            )
        auth = sections["auth"]
        if "tokens_file" in auth:
            auth["tokens_file"] = str(_relative_to(base_dir, auth["tokens_file"]))
            try:
                TokenBook.load(Path(auth["tokens_file"]))
            except TokenFileError as exc:
                reader.problem(entries["auth"][1], f"auth: {exc}")
        tls = sections["tls"]
        for key in ("cert", "key", "client_ca"):
            if key in tls:
                tls[key] = str(_relative_to(base_dir, tls[key]))
        if "cert" in tls and "key" in tls:
            try:
                server_context(tls)
            except TlsSetupError as exc:
                reader.problem(entries["tls"][1], f"tls: {exc}")
        tcp = sections["organism"].get("tcp")
        if tcp is not None:
            exposed = exposure_problem(parse_tcp_address(tcp)[0], has_tls=bool(tls), has_auth=bool(auth))
            if exposed is not None:
                reader.problem(entries["organism"][1], f"organism.tcp {tcp}: {exposed}")
        specs = _read_listeners(reader, entries["listeners"][1]) if "listeners" in entries else []
        limits: PumpLimits | None = None
        try:
            limits = PumpLimits(**sections["pump"])
        except ValueError as exc:
            reader.problem(entries["pump"][1] if "pump" in entries else None, f"pump: {exc}")
        listeners = [listener for spec in specs if (listener := _build_listener(reader, spec)) is not None]
        if reader.problems or limits is None:
            raise ConfigError(path, reader.problems)
        organism = Organism.of(sections["organism"]["name"], listeners, limits)
        organism.settings = {
            **sections["organism"],
            "base_dir": str(base_dir) if base_dir is not None else None,
            "backend": sections["backend"],
            "process_pool": sections["process_pool"],
            "http": sections["http"],
            "auth": auth,
            "tls": tls,
            "observe": sections["observe"],
        }
        return organism
    finally:
        loader.dispose()


def _relative_to(base_dir: Path | None, configured: str) -> Path:
    path = Path(configured)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _plain_document(path: str | Path) -> Any:
    """organism.yaml as plain YAML values, for readers that must not import any handler."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [Problem(None, f"cannot read the file: {exc.strerror or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [Problem(None, f"not valid YAML: {exc}")]) from None


def read_token_setup(path: str | Path) -> tuple[Path, dict[str, bool]]:
    """The tokens file organism.yaml names, and its listeners (name -> open to clients), importing nothing.

    ``xml-pipeline token`` uses it: editing tokens must work while a handler does not import.
    """
    document = _plain_document(path)
    auth = document.get("auth") if isinstance(document, dict) else None
    if not isinstance(auth, dict) or not isinstance(auth.get("tokens_file"), str):
        raise ConfigError(str(path), [Problem(None, "there is no auth section naming a tokens_file")])
    listeners = document.get("listeners")
    entries = [entry for entry in listeners if isinstance(entry, dict)] if isinstance(listeners, list) else []
    names = {str(entry.get("name")): entry.get("ingress") is True for entry in entries}
    return _relative_to(Path(path).resolve().parent, auth["tokens_file"]), names


def load_organism(path: str | Path) -> Organism:
    """Read organism.yaml at ``path``; its directory becomes importable first."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [Problem(None, f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [Problem(None, "the file is not UTF-8 text")]) from None
    base = file.resolve().parent
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    return load_organism_text(text, str(path), base)


def read_organism_section(path: str | Path) -> dict[str, Any]:
    """Only the ``organism`` mapping (name, socket, tcp...), without importing any handler.

    Clients such as ``xml-pipeline send`` use it to find the daemon's socket.
    """
    document = _plain_document(path)
    section = document.get("organism") if isinstance(document, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ConfigError(str(path), [Problem(None, "the 'organism' section with a 'name' is missing")])
    return {**section, "base_dir": str(Path(path).resolve().parent)}

"""organism.yaml: the example loads, and every mistake is reported with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.daemon_support import cli
from xml_pipeline.config.loader import ConfigError, load_organism, load_organism_text
from xml_pipeline.organism import Organism

BROKEN = ROOT / "tests" / "fixtures" / "broken_organism.yaml"

EXPECTED = [
    (2, "organism: unknown key 'nam'"),
    (2, "organism: 'name' is missing"),
    (4, "pump.queue_size must be at least 1: -1"),
    (5, "pump.max_depth must be a whole number, not True"),
    (6, "pump.repair must be true or false, not 'sometimes'"),
    (8, "backend.type redis needs backend.redis_url"),
    (11, "listener 'greeter': cannot import payload class 'workers.hello.Nope'"),
    (13, "listener 'greeter': peer 'ghost' is not a listener of this organism"),
    (14, "listener 'greeter' is defined twice (first on line 10)"),
    (17, "listeners[2].name starts with 'system', which is reserved"),
    (19, "handler 'workers.hello.Greeting' is not an async function"),
    (21, "listeners[2]: unknown key 'colour'"),
    (23, "listener 'sync': cannot import payload class 'no_such_module.Thing': ModuleNotFoundError"),
    (24, "listener 'sync': handler 'os.path.join' is not an async function"),
    (25, "listeners[3].timeout_seconds must be greater than 0: 0"),
    (27, "'tests.fixtures.bad_payloads.Untyped' cannot be an XML contract: Untyped.mapping: unsupported type"),
    (29, "listeners[4].max_concurrency must be a whole number, not 'many'"),
    (30, "unknown top-level key 'extra'"),
]


def test_example_organism_loads(example_organism: Organism) -> None:
    assert example_organism.name == "hello"
    assert list(example_organism.listeners) == ["greeter", "shouter", "exclaimer", "cruncher"]
    assert example_organism.listeners["cruncher"].cpu_bound is True
    assert example_organism.settings["process_pool"] == {"workers": 2}
    assert example_organism.listeners["exclaimer"].peers == frozenset()
    assert example_organism.listeners["greeter"].peers == frozenset({"shouter"})


def test_every_mistake_is_reported_at_once_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_organism(BROKEN)
    found = [(problem.line, problem.message) for problem in caught.value.problems]
    for line, fragment in EXPECTED:
        assert any(at == line and fragment in message for at, message in found), (line, fragment, found)
    assert len(found) == len(EXPECTED), found
    assert str(caught.value).splitlines()[0].startswith(f"{BROKEN}:2: ")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("organism: {name: x}\nlisteners: [\n", 3, "not valid YAML"),
        ("", None, "the file is empty"),
        ("- just\n- a list\n", 1, "must be a mapping"),
        ("organism: {name: x}\n", 1, "'listeners' section is missing"),
        ("organism: {name: x}\nlisteners: []\n", 2, "at least one listener"),
        ("organism: {name: x}\norganism: {name: y}\nlisteners: []\n", 2, "'organism' is given twice"),
        (
            "organism: {name: x}\nlisteners:\n  - {name: a, handler: workers.hello.greet}\n",
            3,
            "'payload_class' is missing",
        ),
    ],
)
def test_document_level_mistakes(text: str, line: int | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_organism_text(text)
    assert any(p.line == line and fragment in p.message for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("kind", ["memory", "manager"])
def test_at_least_once_delivery_is_refused_on_a_single_daemon_backend(kind: str) -> None:
    text = (
        f"organism: {{name: x}}\nbackend:\n  type: {kind}\n  delivery: at-least-once\n"
        "listeners:\n  - {name: a, payload_class: workers.hello.Greeting, handler: workers.hello.greet}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_organism_text(text)
    assert any("delivery at-least-once needs backend.type redis" in p.message for p in caught.value.problems)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_organism(tmp_path / "missing.yaml")


def test_settings_reach_the_organism(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text(
        "organism: {name: tuned, log_level: debug}\n"
        "pump: {queue_size: 7, max_in_flight: 3, repair: true}\n"
        "listeners:\n"
        "  - {name: g, payload_class: workers.hello.Greeting, handler: workers.hello.greet,"
        " timeout_seconds: 1.5, max_concurrency: 2, agent: true, description: hi}\n"
    )
    organism = load_organism(path)
    assert (organism.limits.queue_size, organism.limits.max_in_flight, organism.limits.repair) == (7, 3, True)
    assert organism.settings["log_level"] == "debug"
    listener = organism.listeners["g"]
    assert (listener.timeout_seconds, listener.max_concurrency, listener.agent, listener.description) == (
        1.5,
        2,
        True,
        "hi",
    )
    assert listener.peers is None


def test_problems_quote_long_values_shortened() -> None:
    text = f"organism: {{name: x}}\npump: {{repair: {'y' * 1000}, max_depth: {list(range(500))}}}\nlisteners: []\n"
    with pytest.raises(ConfigError) as caught:
        load_organism_text(text)
    messages = {problem.message.split(" must ")[0]: problem.message for problem in caught.value.problems}
    assert messages["pump.repair"] == f"pump.repair must be true or false, not '{'y' * 118}…"
    assert messages["pump.max_depth"].startswith("pump.max_depth must be a whole number, not [0, 1, 2,")
    assert len(messages["pump.max_depth"]) <= len("pump.max_depth must be a whole number, not ") + 120


ALIAS_BOMB = """\
listeners:
  - name: x
    payload_class: workers.hello.Greeting
    handler: workers.hello.greet
    description: &a [x, x, x, x, x, x, x, x, x]
    ingress: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    agent: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    cpu_bound: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    timeout_seconds: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    max_concurrency: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    peers: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
organism: {name: bomb}
"""


def test_an_alias_bomb_is_refused_in_a_few_lines(tmp_path: Path) -> None:
    bomb = tmp_path / "organism.yaml"
    bomb.write_text(ALIAS_BOMB)
    checked = cli("check", str(bomb))
    assert checked.returncode == 2
    assert len(checked.stdout) + len(checked.stderr) < 500, checked.stderr[:2000]
    assert "aliases (*name) stand for more than 100,000 values" in checked.stderr


def test_an_alias_that_contains_itself_is_refused() -> None:
    with pytest.raises(ConfigError, match="or for a value inside itself"):
        load_organism_text("organism: {name: x}\nlisteners: &loop [*loop]\n")


def test_ordinary_aliases_still_load() -> None:
    organism = load_organism_text(
        "organism: {name: x}\nlisteners:\n"
        "  - {name: a, payload_class: workers.hello.Greeting, handler: workers.hello.greet, peers: &p [b]}\n"
        "  - {name: b, payload_class: workers.hello.Greeting, handler: workers.hello.greet, peers: *p}\n",
        base_dir=ROOT,
    )
    assert organism.listeners["a"].peers == organism.listeners["b"].peers == frozenset({"b"})


def _problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_organism_text(text)
    return [problem.message for problem in caught.value.problems]


LISTENERS_TEXT = (
    "listeners:\n  - {name: greeter, payload_class: workers.hello.Greeting, handler: workers.hello.greet, peers: []}\n"
)


def test_a_bad_redis_url_is_reported_once_as_bad_not_also_as_missing() -> None:
    problems = _problems_of("organism: {name: x}\nbackend: {type: redis, redis_url: 'http://x:1/'}\n" + LISTENERS_TEXT)
    assert len(problems) == 1, problems
    assert "redis_url" in problems[0]
    assert "needs backend.redis_url" not in problems[0]


def test_durable_only_keys_off_durable_mode_name_just_the_keys_written() -> None:
    text = "organism: {name: x}\nbackend: {type: redis, redis_url: 'redis://x:1/0', max_deliveries: 5}\n"
    problems = _problems_of(text + LISTENERS_TEXT)
    assert problems == ["max_deliveries only applies to delivery at-least-once"]

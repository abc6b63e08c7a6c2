"""Payload dataclasses <-> XML: the derived schema, exact round trips, refusals."""

from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lxml import etree

import workers.cpu
import workers.hello
from benchmarks import workload
from benchmarks.workload import Greeting, Order, Receipt, sample_order
from xml_pipeline.message import system_payloads
from xml_pipeline.message.envelope import envelope_bytes, read_envelope, serialize_envelope
from xml_pipeline.message.payload_codec import (
    PayloadCodec,
    PayloadDecodeError,
    PayloadTypeError,
    _builds_directly,
    _TypeAnalyzer,
    codec_for,
)
from xml_pipeline.message.safe_xml import XmlLimits, parse_checked
from xml_pipeline.primitives import payloads as primitive_payloads

THREAD = "3f2a9c1e-0b7d-4e7a-9a51-6d2b8f1c0e42"


def through_the_wire(payload: Any) -> Any:
    """Serialize in an envelope, parse as untrusted input, validate, decode: the pump's path."""
    codec = codec_for(type(payload))
    raw = serialize_envelope("a", "b", THREAD, codec.to_element(payload))
    envelope = read_envelope(parse_checked(raw, XmlLimits(max_bytes=50_000_000, max_depth=200)).root)
    assert codec.validate(envelope.payload) is None
    return codec.from_element(envelope.payload)


class Mood(enum.Enum):
    HAPPY = "happy"
    GRUMPY = "grumpy"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 10


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Everything:
    text: str
    number: int
    ratio: float
    flag: bool
    mood: Mood
    level: Level
    where: Point
    path: list[Point]
    blob: bytes
    maybe: Optional[str] = None  # noqa: UP045 - Optional is part of what we support
    tags: list[str] = field(default_factory=list)
    sparse: list[int | None] = field(default_factory=list)
    nested: list[list[str]] = field(default_factory=list)
    named_default: str | None = "fallback"


def test_derived_schema_names_every_field_with_its_xsd_type() -> None:
    xsd = etree.fromstring(codec_for(Everything).xsd)
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    root = xsd.find("xs:element", ns)
    assert root is not None
    assert root.get("name") == "Everything"
    fields = {
        e.get("name"): e for e in xsd.findall("xs:complexType[@name='Everything_Type']/xs:sequence/xs:element", ns)
    }
    assert list(fields) == [f.name for f in dataclasses.fields(Everything)]
    assert fields["text"].get("type") == "xs:string"
    assert fields["number"].get("type") == "xs:integer"
    assert fields["ratio"].get("type") == "xs:double"
    assert fields["flag"].get("type") == "xs:boolean"
    assert fields["blob"].get("type") == "xs:base64Binary"
    assert fields["text"].get("minOccurs") is None  # required
    assert fields["tags"].get("minOccurs") == "0"  # has a default
    assert fields["maybe"].get("nillable") == "true"
    mood = xsd.find("xs:simpleType[@name='Mood_Enum']", ns)
    assert mood is not None
    assert [e.get("value") for e in mood.iter("{*}enumeration")] == ["happy", "grumpy"]


EDGE_CASES = [
    Everything(
        text="<tag> & \"quotes\" 'single' ]]> \r\n\t unicode: é 漢字 🎉",
        number=-(2**70),
        ratio=-0.0,
        flag=False,
        mood=Mood.GRUMPY,
        level=Level.HIGH,
        where=Point(-1, 0),
        path=[],
        blob=b"\x00\xff binary",
        maybe="",
        tags=["", " ", "a"],
        sparse=[None, 0, None],
        nested=[[], [""], ["x", "y"]],
        named_default=None,
    ),
    Everything("", 0, math.inf, True, Mood.HAPPY, Level.LOW, Point(0, 0), [Point(1, 2)], b"", None),
    Everything("  padded  ", 1, -math.inf, True, Mood.HAPPY, Level.LOW, Point(0, 0), [], b"x", "\n"),
]


@pytest.mark.parametrize("payload", EDGE_CASES)
def test_edge_cases_round_trip_exactly(payload: Everything) -> None:
    assert through_the_wire(payload) == payload


def test_nan_round_trips() -> None:
    @dataclass
    class Measure:
        value: float

    assert math.isnan(through_the_wire(Measure(math.nan)).value)


def test_absent_optional_fields_take_their_defaults() -> None:
    codec = codec_for(Everything)
    element = etree.fromstring(
        b"<Everything><text>t</text><number>1</number><ratio>1.5</ratio><flag>1</flag><mood>happy</mood>"
        b"<level>1</level><where><x>1</x><y>2</y></where><path/><blob/></Everything>"
    )
    assert codec.validate(element) is None
    decoded = codec.from_element(element)
    assert (decoded.maybe, decoded.tags, decoded.named_default, decoded.flag) == (None, [], "fallback", True)


@pytest.mark.parametrize(
    ("cls_fields", "message"),
    [
        ([("d", dict[str, int])], "unsupported type"),
        ([("t", tuple[int, int])], "unsupported type"),
        ([("u", int | str)], "only Optional"),
        ([("l", list)], "list needs an item type"),
        ([("a", Any)], "unsupported type"),
    ],
)
def test_unsupported_field_types_are_refused_when_the_codec_is_built(
    cls_fields: list[tuple[str, Any]], message: str
) -> None:
    cls = dataclasses.make_dataclass("Bad", cls_fields)
    with pytest.raises(PayloadTypeError, match=message):
        PayloadCodec(cls)


def test_non_dataclass_is_refused() -> None:
    with pytest.raises(PayloadTypeError, match="not a dataclass"):
        PayloadCodec(int)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (Point("1", 2), "expected int"),  # type: ignore[arg-type]
        (Point(True, 2), "expected int"),
        (Point(1, None), "None in a non-optional field"),  # type: ignore[arg-type]
    ],
)
def test_values_that_do_not_fit_their_field_are_refused(payload: Point, message: str) -> None:
    with pytest.raises(PayloadTypeError, match=message):
        codec_for(Point).to_element(payload)


def test_text_that_xml_cannot_carry_is_refused_not_corrupted() -> None:
    @dataclass
    class Note:
        text: str

    with pytest.raises(PayloadTypeError, match="XML compatible"):
        codec_for(Note).to_element(Note("bell \x07"))


def test_custom_element_name_and_namespace() -> None:
    @dataclass
    class Order:
        __xml_name__ = "order"
        __xml_namespace__ = "urn:shop"
        sku: str

    codec = codec_for(Order)
    assert codec.tag == "{urn:shop}order"
    element = codec.to_element(Order("A-1"))
    assert etree.tostring(element) == b'<order xmlns="urn:shop"><sku>A-1</sku></order>'  # sku in urn:shop too
    assert through_the_wire(Order("A-1")) == Order("A-1")


def test_schema_violation_is_reported_not_decoded() -> None:
    codec = codec_for(Point)
    with pytest.raises(PayloadDecodeError, match="x"):
        codec.from_bytes(b"<Point><x>one</x><y>2</y></Point>")


@dataclass(frozen=True)
class Single:
    only: float


def test_all_required_classes_read_their_children_in_one_step() -> None:
    assert through_the_wire(Single(2.5)) == Single(2.5)
    assert through_the_wire(Point(1, -2)) == Point(1, -2)


def test_unvalidated_elements_with_the_wrong_shape_fail_as_decode_errors() -> None:
    codec = codec_for(Point)
    with pytest.raises(PayloadDecodeError, match="3 children, not 2"):
        codec.from_element(etree.fromstring(b"<Point><x>1</x><y>2</y><z>3</z></Point>"))
    with pytest.raises(PayloadDecodeError, match="Single"):
        codec_for(Single).from_element(etree.fromstring(b"<Single/>"))


@dataclass
class Spaced:
    __xml_namespace__ = "urn:example:spaced"
    note: str


@pytest.mark.parametrize(
    ("sender", "to", "payload"),
    [
        ("orders", "console", Point(1, 2)),
        ("system", None, Spaced("a & b < c > d ü 😀")),
        ("weird&<>é", "to.sub-name", Everything("t", 1, 0.5, True, Mood.HAPPY, Level.LOW, Point(0, 0), [], b"x")),
    ],
)
def test_envelope_bytes_equal_a_serialized_envelope(sender: str, to: str | None, payload: Any) -> None:
    codec = codec_for(type(payload))
    expected = serialize_envelope(sender, to, THREAD, codec.to_element(payload))
    assert envelope_bytes(sender, to, THREAD, etree.tostring(codec.to_element(payload))) == expected


# ---------------------------------------------------------------- property-based

XML_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("\t\n\r"),
        st.characters(min_codepoint=0x20, max_codepoint=0xD7FF),
        st.characters(min_codepoint=0xE000, max_codepoint=0xFFFD),
        st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
    ),
    max_size=30,
)
_names = itertools.count()

# A type description is (annotation, strategy for its values).
TypeAndValues = tuple[Any, st.SearchStrategy[Any]]

SCALARS: list[TypeAndValues] = [
    (str, XML_TEXT),
    (int, st.integers()),
    (float, st.floats(allow_nan=False)),
    (bool, st.booleans()),
    (bytes, st.binary(max_size=20)),
    (Mood, st.sampled_from(Mood)),
    (Level, st.sampled_from(Level)),
]


def _optional(inner: TypeAndValues) -> TypeAndValues:
    annotation, values = inner
    return Optional[annotation], st.none() | values  # noqa: UP045


def _list_of(inner: TypeAndValues) -> TypeAndValues:
    annotation, values = inner
    return list[annotation], st.lists(values, max_size=4)  # type: ignore[valid-type]


@st.composite
def _dataclass_of(draw: st.DrawFn, members: st.SearchStrategy[TypeAndValues]) -> TypeAndValues:
    kinds = draw(st.lists(members, min_size=1, max_size=5))
    with_defaults = draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
    spec: list[Any] = []
    # fields with defaults must follow those without
    ordered = sorted(zip(kinds, with_defaults, strict=True), key=lambda pair: pair[1])
    for index, ((annotation, values), has_default) in enumerate(ordered):
        if has_default:
            default = draw(values)
            spec.append((f"f{index}", annotation, field(default_factory=lambda d=default: d)))
        else:
            spec.append((f"f{index}", annotation))
    cls = dataclasses.make_dataclass(f"Generated{next(_names)}", spec)
    field_values = {f"f{i}": kind[1] for i, (kind, _) in enumerate(ordered)}
    return cls, st.builds(cls, **field_values)


TYPES: st.SearchStrategy[TypeAndValues] = st.recursive(
    st.sampled_from(SCALARS),
    lambda inner: st.one_of(inner.map(_optional), inner.map(_list_of), _dataclass_of(inner)),
    max_leaves=8,
)


@st.composite
def payload_classes_and_values(draw: st.DrawFn) -> Any:
    _cls, values = draw(_dataclass_of(TYPES))
    return draw(values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload_classes_and_values())
def test_any_supported_dataclass_round_trips_through_the_wire(payload: Any) -> None:
    assert through_the_wire(payload) == payload


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        Everything,
        text=XML_TEXT,
        number=st.integers(),
        ratio=st.floats(allow_nan=False),
        flag=st.booleans(),
        mood=st.sampled_from(Mood),
        level=st.sampled_from(Level),
        where=st.builds(Point, st.integers(), st.integers()),
        path=st.lists(st.builds(Point, st.integers(), st.integers()), max_size=3),
        blob=st.binary(max_size=30),
        maybe=st.none() | XML_TEXT,
        tags=st.lists(XML_TEXT, max_size=4),
        sparse=st.lists(st.none() | st.integers(), max_size=4),
        nested=st.lists(st.lists(XML_TEXT, max_size=3), max_size=3),
        named_default=st.none() | XML_TEXT,
    )
)
def test_the_everything_payload_round_trips(payload: Everything) -> None:
    assert through_the_wire(payload) == payload


# ------------------------------------------------- the fast reader against the plain one


@dataclass(frozen=True)
class SelfChecked:
    """A class whose ``__post_init__`` refuses values: the decoder must still call it."""

    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


@dataclass(frozen=True, slots=True)
class Slotted:
    number: int
    name: str


@dataclass
class Guarded:
    """A mutable class with its own ``__setattr__``: ``__init__`` goes through it."""

    name: str

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value.upper() if isinstance(value, str) else value)


@dataclass(frozen=True)
class Counted:
    """A class whose ``__new__`` counts the instances made: decoding must still go through it."""

    made: typing.ClassVar[list[str]] = []
    name: str

    def __new__(cls, *args: Any, **kwargs: Any) -> Counted:
        cls.made.append("new")
        return super().__new__(cls)


class Registering(type):
    """A metaclass whose ``__call__`` sees every instance made."""

    made: typing.ClassVar[list[str]] = []

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        Registering.made.append(cls.__name__)
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Registered(metaclass=Registering):
    name: str


@dataclass(frozen=True)
class Tree:
    label: str
    children: list[Tree]


def plain_writer(cls: type) -> Any:
    """The writer of ``cls`` without the fast paths: float fields through their spec's own writer."""
    namespace = codec_for(cls).namespace
    return _TypeAnalyzer(f"{{{namespace}}}" if namespace else "", fast=False).dataclass_spec(cls).write


def _written(write: Any, codec: PayloadCodec[Any], payload: Any) -> Any:
    element = etree.Element(codec.tag, nsmap={None: codec.namespace} if codec.namespace else None)
    try:
        write(element, payload, codec.xml_name)
    except PayloadTypeError as exc:
        return ("refused", str(exc))
    return ("written", etree.tostring(element))


def writers_agree(payload: Any) -> None:
    codec = codec_for(type(payload))
    assert _written(codec._spec.write, codec, payload) == _written(plain_writer(type(payload)), codec, payload)


def plain_reader(cls: type) -> Any:
    """The reader of ``cls`` without the fast paths: instances made by ``cls(...)``, lists by their own reader."""
    codec = codec_for(cls)
    namespace = codec.namespace
    return _TypeAnalyzer(f"{{{namespace}}}" if namespace else "", fast=False).dataclass_spec(cls).read


def _outcome(read: Any, element: etree._Element) -> Any:
    try:
        value = read(element)
    except (ValueError, KeyError, TypeError) as exc:
        return ("refused", type(exc).__name__)
    return ("read", _state(value))


def _state(value: Any) -> Any:
    """Everything a value holds, class and attributes all the way down (``==`` alone may be a custom ``__eq__``, and NaN
    is never equal to itself); the attributes in the order the instance holds them, where it has a ``__dict__``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = list(vars(value)) if hasattr(value, "__dict__") else [f.name for f in dataclasses.fields(value)]
        return (type(value), [(name, _state(getattr(value, name))) for name in names])
    if isinstance(value, list):
        return [_state(item) for item in value]
    return (type(value), repr(value))


def _shapes(element: etree._Element) -> list[etree._Element]:
    """``element`` as written, and unvalidated variants: a child dropped, a child doubled, texts emptied or garbled."""
    variants = [element]
    for index in range(len(element)):
        dropped = copy.deepcopy(element)
        del dropped[index]
        doubled = copy.deepcopy(element)
        doubled.insert(index, copy.deepcopy(element[index]))
        variants += [dropped, doubled]
    for text in ("", "x", " 7 ", "true", "NaN"):
        garbled = copy.deepcopy(element)
        for node in garbled.iter():
            if len(node) == 0 and node is not garbled:
                node.text = text
        variants.append(garbled)
    return variants


def agree(payload: Any) -> None:
    writers_agree(payload)
    codec = codec_for(type(payload))
    fast, plain = codec._spec.read, plain_reader(type(payload))
    for element in _shapes(codec.to_element(payload)):
        assert _outcome(fast, element) == _outcome(plain, element), etree.tostring(element)
    assert _state(codec.from_element(codec.to_element(payload))) == _state(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload_classes_and_values())
def test_the_fast_reader_reads_and_refuses_as_the_plain_one(payload: Any) -> None:
    agree(payload)


@pytest.mark.parametrize(
    "payload",
    [
        Everything("t & <u> ü 😀", -3, -0.0, False, Mood.GRUMPY, Level.HIGH, Point(1, 2), [Point(3, 4)], b"\x00\xff"),
        Everything("", 0, math.inf, True, Mood.HAPPY, Level.LOW, Point(0, 0), [], b"", "m", ["", "a"], [None, 1]),
        Everything("x", 1, 1e-300, True, Mood.HAPPY, Level.LOW, Point(0, 0), [], b"", None, [], [], [["a"], []], None),
        sample_order(3),
        Receipt("ORD-1", 12.5, 2),
        Greeting("ada", 2),
        Single(-1.5),
        Spaced("a & b"),
        SelfChecked(2),
        Slotted(1, "a"),
        Guarded("a"),
        Counted("a"),
        Registered("a"),
        Tree("root", [Tree("leaf", []), Tree("other", [Tree("deep", [])])]),
    ],
)
def test_the_fast_reader_agrees_on_the_example_payloads(payload: Any) -> None:
    agree(payload)


def _payload_classes(*modules: Any) -> list[type]:
    return [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
    ]


EXAMPLE_CLASSES = _payload_classes(workers.cpu, workers.hello, workload, system_payloads, primitive_payloads)


@pytest.mark.parametrize("cls", EXAMPLE_CLASSES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_fast_reader_agrees_on_every_example_payload_class(cls: type, data: st.DataObject) -> None:
    values = {field.name: data.draw(st.from_type(hint)) for field, hint in _hints(cls)}
    try:
        payload = cls(**values)
        codec_for(cls).to_element(payload)
    except (ValueError, TypeError):  # text XML cannot carry, or a value the class itself refuses
        assume(False)
    agree(payload)


def _hints(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls)]


def test_only_classes_whose_init_just_stores_the_fields_are_filled_directly() -> None:
    assert _builds_directly(Point)
    assert _builds_directly(Everything)
    assert _builds_directly(Tree)
    assert not _builds_directly(SelfChecked)
    assert not _builds_directly(Slotted)
    assert not _builds_directly(Guarded)


def test_a_class_new_and_a_metaclass_call_still_run_when_decoding() -> None:
    assert not _builds_directly(Counted)
    assert not _builds_directly(Registered)
    Counted.made.clear()
    Registering.made.clear()
    assert through_the_wire(Counted("a")) == Counted("a")
    assert through_the_wire(Registered("a")) == Registered("a")
    assert len(Counted.made) == 3  # the two made here, and the one decoded
    assert Registering.made == ["Registered"] * 3


def test_post_init_still_runs_and_refuses_when_decoding() -> None:
    with pytest.raises(PayloadDecodeError, match="negative"):
        codec_for(SelfChecked).from_element(etree.fromstring(b"<SelfChecked><count>-1</count></SelfChecked>"))


def test_a_class_setattr_still_runs_when_decoding() -> None:
    assert codec_for(Guarded).from_element(etree.fromstring(b"<Guarded><name>ada</name></Guarded>")).name == "ADA"


def test_directly_filled_instances_are_whole_instances() -> None:
    decoded = through_the_wire(sample_order(1))
    assert type(decoded) is Order
    assert decoded == sample_order(1)
    assert hash(through_the_wire(Point(1, 2))) == hash(Point(1, 2))
    assert list(vars(decoded)) == [field.name for field in dataclasses.fields(Order)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.city = "Paris"  # type: ignore[misc]


@dataclass
class Measured:
    value: float
    maybe: float | None = None
    many: list[float] = field(default_factory=list)


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1.5, -2, 10**20, True, math.inf, -math.inf, math.nan, 1e308, 5e-324, "1.5", None, Level.HIGH, 10**400],
)
def test_the_fast_writer_writes_and_refuses_floats_as_the_plain_one(value: Any) -> None:
    codec = codec_for(Measured)
    for payload in (Measured(value), Measured(0.5, value), Measured(0.5, None, [value])):
        try:
            plain = _written(plain_writer(Measured), codec, payload)
        except OverflowError:
            with pytest.raises(OverflowError):
                _written(codec._spec.write, codec, payload)
            continue
        assert _written(codec._spec.write, codec, payload) == plain

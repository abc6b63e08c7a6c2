"""Payload dataclasses <-> XML elements, and the XSD that is their contract.

A payload class maps to one element named after the class (or its
``__xml_name__``), optionally in the namespace ``__xml_namespace__``; each field
is a child element in declaration order. The XSD is derived from the same type
analysis that drives reading and writing, so the three cannot drift apart.

Encoding rules, chosen so that every value round-trips exactly:

* ``str`` is element text; ``""`` is an empty element, distinct from absence.
* ``int`` -> ``xs:integer``, ``float`` -> ``xs:double`` (``INF``, ``-INF``,
  ``NaN``), ``bool`` -> ``xs:boolean``, ``bytes`` -> ``xs:base64Binary``.
* ``Enum`` -> the member's value as text, restricted to the known values.
* ``list[T]`` -> a wrapper element holding one ``<item>`` per entry, so that
  an empty list (``<tags/>``) differs from ``None`` (element absent).
* nested dataclasses -> a child element holding the nested fields.
* ``Optional[T]``: ``None`` is the element left out when the field's default is
  ``None`` (or it has none), otherwise ``xsi:nil="true"``; list items that are
  ``None`` are always ``xsi:nil``.
* a field with a default may be absent from the XML; it then takes the default.
* with ``__xml_namespace__`` every element of the payload is in that namespace
  (``elementFormDefault="qualified"``), as namespaced XML usually is.

Strings must consist of XML 1.0 characters; writing one that does not raises
:class:`PayloadTypeError` rather than producing a document nobody can parse.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, Union

from lxml import etree

from xml_pipeline.message.safe_xml import XmlLimits, parse_untrusted, schema_error

XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
_NIL_TRUE = ("true", "1")
ITEM = "item"


class PayloadTypeError(TypeError):
    """A payload class uses a type we cannot map, or a value does not fit its field."""


class PayloadDecodeError(ValueError):
    """XML that passed the schema still could not become the dataclass."""


class _Spec(Protocol):
    def write(self, element: etree._Element, value: Any, path: str) -> None: ...
    def read(self, element: etree._Element) -> Any: ...
    def xsd_type(self, schema: _SchemaWriter) -> str: ...


def _element_text(element: etree._Element) -> str:
    """The element's character content, skipping any comments or PIs inside."""
    text = element.text or ""
    if len(element):
        return text + "".join(child.tail or "" for child in element)
    return text


class _StrSpec:
    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise PayloadTypeError(f"{path}: expected str, got {type(value).__name__}")
        if value:
            try:
                element.text = value
            except ValueError as exc:
                raise PayloadTypeError(f"{path}: {exc}") from None

    def read(self, element: etree._Element) -> Any:
        return _element_text(element)

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return "xs:string"


class _IntSpec:
    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if type(value) is bool or not isinstance(value, int):
            raise PayloadTypeError(f"{path}: expected int, got {type(value).__name__}")
        element.text = str(int(value))

    def read(self, element: etree._Element) -> Any:
        return int(_element_text(element).strip())

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return "xs:integer"


class _FloatSpec:
    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if type(value) is bool or not isinstance(value, (int, float)):
            raise PayloadTypeError(f"{path}: expected float, got {type(value).__name__}")
        number = float(value)
        if math.isnan(number):
            element.text = "NaN"
        elif math.isinf(number):
            element.text = "INF" if number > 0 else "-INF"
        else:
            element.text = repr(number)

    def read(self, element: etree._Element) -> Any:
        return _parse_float(_element_text(element))

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return "xs:double"


def _parse_float(text: str | None) -> float:
    """xs:double text (already schema-checked): float() reads all of it, INF, -INF
    and NaN included, and ignores surrounding whitespace as the schema does."""
    return float(text)  # type: ignore[arg-type]  # None: a TypeError, reported as a decode error


class _BoolSpec:
    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise PayloadTypeError(f"{path}: expected bool, got {type(value).__name__}")
        element.text = "true" if value else "false"

    def read(self, element: etree._Element) -> Any:
        return _element_text(element).strip() in ("true", "1")

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return "xs:boolean"


class _BytesSpec:
    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if not isinstance(value, (bytes, bytearray)):
            raise PayloadTypeError(f"{path}: expected bytes, got {type(value).__name__}")
        if value:
            element.text = base64.b64encode(value).decode("ascii")

    def read(self, element: etree._Element) -> Any:
        return base64.b64decode("".join(_element_text(element).split()))

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return "xs:base64Binary"


class _EnumSpec:
    def __init__(self, enum_cls: type[enum.Enum]) -> None:
        self.enum_cls = enum_cls
        self.by_text = {str(member.value): member for member in enum_cls}
        if len(self.by_text) != len(enum_cls):
            raise PayloadTypeError(f"enum {enum_cls.__qualname__}: two members share one text value")

    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if not isinstance(value, self.enum_cls):
            raise PayloadTypeError(f"{path}: expected {self.enum_cls.__name__}, got {type(value).__name__}")
        text = str(value.value)
        if text:
            element.text = text

    def read(self, element: etree._Element) -> Any:
        return self.by_text[_element_text(element)]

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return schema.enum_type(self)


class _ListSpec:
    def __init__(self, item: _Spec, item_nullable: bool, item_tag: str) -> None:
        self.item = item
        self.item_nullable = item_nullable
        self.item_tag = item_tag

    def write(self, element: etree._Element, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise PayloadTypeError(f"{path}: expected list, got {type(value).__name__}")
        for index, entry in enumerate(value):
            child = etree.SubElement(element, self.item_tag)
            if entry is None:
                if not self.item_nullable:
                    raise PayloadTypeError(f"{path}[{index}]: None in a list of non-optional items")
                child.set(XSI_NIL, "true")
            else:
                self.item.write(child, entry, f"{path}[{index}]")

    def read(self, element: etree._Element) -> Any:
        read = self.item.read
        if not self.item_nullable:
            return [read(child) for child in element]
        return [None if child.get(XSI_NIL) in _NIL_TRUE else read(child) for child in element]

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return schema.list_type(self)


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    tag: str
    spec: _Spec
    nullable: bool
    required: bool
    default: Any
    default_factory: Callable[[], Any] | None

    def default_value(self) -> Any:
        if self.default_factory is not None:
            return self.default_factory()
        return self.default

    @property
    def omit_none(self) -> bool:
        """Whether ``None`` can be written by leaving the element out."""
        if self.required:
            return True
        return self.default_factory is None and self.default is None


class _DataclassSpec:
    """Reads and writes one dataclass's fields as child elements.

    ``read`` and ``write`` are compiled once per class into straight-line
    Python (see :func:`_compile`): every hop of every message goes through
    them, and a loop over field plans costs three times as much.
    """

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields: tuple[_FieldPlan, ...] = ()

    def compile(self, *, fast: bool = True) -> None:
        self.read, self.write = _compile(self, fast=fast)  # type: ignore[method-assign,assignment]

    def write(self, element: etree._Element, value: Any, path: str) -> None:
        raise AssertionError("compile() replaces this")

    def read(self, element: etree._Element) -> Any:
        raise AssertionError("compile() replaces this")

    def xsd_type(self, schema: _SchemaWriter) -> str:
        return schema.complex_type(self)


def _builds_directly(cls: type) -> bool:
    """Whether an instance of ``cls`` can be made by filling its ``__dict__``, as its ``__init__`` would.

    True only when ``__init__`` is the one ``@dataclass`` generated for ``cls``
    itself, taking exactly the fields in order (no InitVar, no keyword-only
    field), with no ``__post_init__``, no slots, no field that is a data
    descriptor, no ``__new__`` or metaclass of its own, and no ``__setattr__``
    of the class's own to run: then that
    ``__init__`` does nothing but store each argument in ``__dict__`` in field
    order, and filling the dict directly makes an equal object without the
    call (a frozen dataclass's ``__init__`` stores each field through
    ``object.__setattr__``, twice as slow).
    """
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    params = getattr(cls, "__dataclass_params__", None)
    if code is None or params is None or code.co_filename != "<string>" or hasattr(cls, "__post_init__"):
        return False
    if getattr(init, "__qualname__", None) != f"{cls.__qualname__}.__init__":
        return False
    names = tuple(field.name for field in dataclasses.fields(cls))
    if code.co_kwonlyargcount or code.co_varnames[: code.co_argcount] != ("self", *names):
        return False
    if any("__slots__" in vars(klass) for klass in cls.__mro__[:-1]):
        return False
    special: Any = cls  # typed loosely: the stubs' signatures make the identity checks look impossible
    if type(cls) is not type or special.__new__ is not object.__new__:  # cls(...) would run a metaclass or __new__
        return False
    if not params.frozen and special.__setattr__ is not object.__setattr__:
        return False
    return not any(hasattr(inspect.getattr_static(cls, name, None), "__set__") for name in names)


def _compile(spec: _DataclassSpec, *, fast: bool = True) -> tuple[Callable[[etree._Element], Any], Callable[..., None]]:
    """Generate the reader and writer of one dataclass from its field plans.

    Elements reaching the reader passed the derived schema (an xs:sequence, so
    fields come in declaration order) and hold no comments (the parser drops
    them), so one pass over the children in order reads every field, and a
    field's text is its element's ``.text``.

    With ``fast`` (always, outside the tests that hold it to the plain form),
    the reader fills a new instance's ``__dict__`` where
    :func:`_builds_directly` allows, and reads lists in one comprehension
    instead of calling each list's reader.
    """
    namespace: dict[str, Any] = {
        "CLS": spec.cls,
        "NEW": object.__new__,
        "FAST": fast,
        "NIL": _NIL_TRUE,
        "XSI_NIL": XSI_NIL,
        "TRUE": ("true", "1"),
        "sub": etree.SubElement,
        "PayloadTypeError": PayloadTypeError,
        "PayloadDecodeError": PayloadDecodeError,
    }
    if spec.fields and all(plan.required and not plan.nullable for plan in spec.fields):
        read = _read_fixed(spec, namespace)
    else:
        read = _read_sequence(spec, namespace)
    write = [
        "def write(element, value, path):",
        "    if type(value) is not CLS:",
        "        raise PayloadTypeError(f'{path}: expected {CLS.__name__}, got {type(value).__name__}')",
    ]
    for index, plan in enumerate(spec.fields):
        tag, field_spec = f"T{index}", f"S{index}"
        namespace[tag], namespace[field_spec] = plan.tag, plan.spec
        namespace[f"F{index}"] = plan.default_factory
        namespace[f"D{index}"] = plan.default
        write.append(f"    x = value.{plan.name}")
        write.append("    if x is None:")
        if not plan.nullable:
            write.append(f"        raise PayloadTypeError(f'{{path}}.{plan.name}: None in a non-optional field')")
        elif not plan.omit_none:
            write.append(f"        sub(element, {tag}).set(XSI_NIL, 'true')")
        else:
            write.append("        pass")
        write += ["    else:", *_write_statements(plan, tag, field_spec, fast=fast)]
    exec(
        compile("\n".join(read) + "\n\n" + "\n".join(write), f"<payload codec {spec.cls.__qualname__}>", "exec"),
        namespace,
    )
    return namespace["read"], namespace["write"]


def _read_fixed(spec: _DataclassSpec, namespace: dict[str, Any]) -> list[str]:
    """Every field required and never nil: the schema allows exactly one child
    per field, in order, so the children unpack straight into the fields."""
    count = len(spec.fields)
    names = ", ".join(f"e{index}" for index in range(count)) + ("," if count == 1 else "")
    read = [
        "def read(element):",
        f"    if len(element) != {count}:",
        f"        found = f'{{len(element)}} children, not {count}'",
        f"        raise PayloadDecodeError(f'<{spec.cls.__name__}> has {{found}}')",
    ]
    if namespace["FAST"]:  # indexing makes each child a little faster than unpacking an iterator does
        read += [f"    e{index} = element[{index}]" for index in range(count)]
    else:
        read.append(f"    {names} = element")
    for index, plan in enumerate(spec.fields):
        read.append(f"    v{index} = {_read_expression(plan.spec, f'S{index}', namespace, f'e{index}')}")
    return read + _construct(spec, namespace)


def _read_sequence(spec: _DataclassSpec, namespace: dict[str, Any]) -> list[str]:
    """Some fields may be absent: walk the children once, in declaration order
    (the schema is an xs:sequence), matching each against the next field."""
    read = ["def read(element):", "    children = iter(element)", "    e = next(children, None)"]
    for index, plan in enumerate(spec.fields):
        tag, field_spec, value = f"T{index}", f"S{index}", f"v{index}"
        read.append(f"    if e is not None and e.tag == {tag}:")
        if plan.nullable:
            read += ["        if e.get(XSI_NIL) in NIL:", f"            {value} = None", "        else:"]
            read.append(f"            {value} = {_read_expression(plan.spec, field_spec, namespace)}")
        else:
            read.append(f"        {value} = {_read_expression(plan.spec, field_spec, namespace)}")
        read += ["        e = next(children, None)", "    else:"]
        if plan.required and not plan.nullable:
            read.append(f"        raise PayloadDecodeError('<{plan.name}> is missing')")
        elif plan.required:
            read.append(f"        {value} = None")
        elif plan.default_factory is not None:
            read.append(f"        {value} = F{index}()")
        else:
            read.append(f"        {value} = D{index}")
    return read + _construct(spec, namespace)


def _construct(spec: _DataclassSpec, namespace: dict[str, Any]) -> list[str]:
    """The reader's last lines: the instance made from the values ``v0``, ``v1``... read."""
    if namespace["FAST"] and _builds_directly(spec.cls):
        lines = ["    o = NEW(CLS)", "    d = o.__dict__"]
        lines += [f"    d[{plan.name!r}] = v{index}" for index, plan in enumerate(spec.fields)]
        return [*lines, "    return o"]
    arguments = ", ".join(f"v{index}" for index in range(len(spec.fields)))
    return [f"    return CLS({arguments})"]


def _read_expression(spec: _Spec, name: str, namespace: dict[str, Any], element: str = "e") -> str:
    """Python that reads the value of field spec ``name`` from the variable ``element``."""
    if isinstance(spec, _ListSpec) and namespace["FAST"]:
        return _list_expression(spec, name, namespace, element)
    if isinstance(spec, _StrSpec):
        return f"{element}.text or ''"
    if isinstance(spec, _IntSpec):
        return f"int({element}.text)"
    if isinstance(spec, _BoolSpec):
        return f"({element}.text or '').strip() in TRUE"
    if isinstance(spec, _FloatSpec):
        return f"float({element}.text)"
    return f"{name}.read({element})"


def _list_expression(spec: _ListSpec, name: str, namespace: dict[str, Any], element: str) -> str:
    """A list read in one comprehension, its items' reads inlined where they are an expression.

    ``name`` is the Python expression that reaches ``spec``; the items are
    ``c0`` (``c1`` inside it for a list of lists, and so on).
    """
    item = f"c{int(element[1:]) + 1}" if element.startswith("c") else "c0"
    if isinstance(spec.item, (_StrSpec, _IntSpec, _BoolSpec, _FloatSpec, _ListSpec)):
        read = _read_expression(spec.item, f"{name}.item", namespace, item)
    else:  # an enum, bytes or a dataclass: its own reader, looked up as the list is read (it may still be compiling)
        read = f"{name}.item.read({item})"
    if spec.item_nullable:
        read = f"None if {item}.get(XSI_NIL) in NIL else {read}"
    return f"[{read} for {item} in {element}]"


def _write_statements(plan: _FieldPlan, tag: str, name: str, *, fast: bool) -> list[str]:
    where = f"f'{{path}}.{plan.name}'"
    if isinstance(plan.spec, _StrSpec):
        return [
            "        if not isinstance(x, str):",
            f"            raise PayloadTypeError(f'{{path}}.{plan.name}: expected str, got {{type(x).__name__}}')",
            f"        child = sub(element, {tag})",
            "        if x:",
            "            try:",
            "                child.text = x",
            "            except ValueError as exc:",
            f"                raise PayloadTypeError(f'{{path}}.{plan.name}: {{exc}}') from None",
        ]
    if isinstance(plan.spec, _IntSpec):
        return [
            "        if type(x) is bool or not isinstance(x, int):",
            f"            raise PayloadTypeError(f'{{path}}.{plan.name}: expected int, got {{type(x).__name__}}')",
            f"        sub(element, {tag}).text = str(int(x))",
        ]
    if isinstance(plan.spec, _FloatSpec) and fast:  # _FloatSpec.write inlined: x - x is 0.0 for finite numbers only
        return [
            "        if type(x) is bool or not isinstance(x, (int, float)):",
            f"            raise PayloadTypeError(f'{{path}}.{plan.name}: expected float, got {{type(x).__name__}}')",
            "        x = float(x)",
            f"        sub(element, {tag}).text = (",
            "            repr(x) if x - x == 0.0 else 'NaN' if x != x else 'INF' if x > 0 else '-INF'",
            "        )",
        ]
    if isinstance(plan.spec, _BoolSpec):
        return [
            "        if not isinstance(x, bool):",
            f"            raise PayloadTypeError(f'{{path}}.{plan.name}: expected bool, got {{type(x).__name__}}')",
            f"        sub(element, {tag}).text = 'true' if x else 'false'",
        ]
    return [f"        {name}.write(sub(element, {tag}), x, {where})"]


_SCALARS: dict[Any, _Spec] = {
    str: _StrSpec(),
    int: _IntSpec(),
    float: _FloatSpec(),
    bool: _BoolSpec(),
    bytes: _BytesSpec(),
}


class _TypeAnalyzer:
    """Turns annotations into specs, sharing one spec per dataclass (recursion-safe).

    Every element of a payload lives in the payload's namespace (none, usually),
    so ``prefix`` is ``"{namespace}"`` or empty.
    """

    def __init__(self, prefix: str, *, fast: bool = True) -> None:
        self.prefix = prefix
        self.fast = fast
        self.dataclasses: dict[type, _DataclassSpec] = {}

    def spec_for(self, annotation: Any, where: str) -> tuple[_Spec, bool]:
        """Return the spec for ``annotation`` and whether ``None`` is allowed."""
        origin = typing.get_origin(annotation)
        if origin in (Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1 or len(typing.get_args(annotation)) != 2:
                raise PayloadTypeError(f"{where}: only Optional[T] unions are supported, not {annotation}")
            spec, _ = self.spec_for(members[0], where)
            return spec, True
        if annotation is list or origin is list:
            (item_annotation,) = typing.get_args(annotation) or (None,)
            if item_annotation is None:
                raise PayloadTypeError(f"{where}: list needs an item type, e.g. list[str]")
            item_spec, item_nullable = self.spec_for(item_annotation, f"{where}[]")
            return _ListSpec(item_spec, item_nullable, self.prefix + ITEM), False
        if annotation in _SCALARS:
            return _SCALARS[annotation], False
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            return _EnumSpec(annotation), False
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            return self.dataclass_spec(annotation), False
        raise PayloadTypeError(f"{where}: unsupported type {annotation!r}")

    def dataclass_spec(self, cls: type) -> _DataclassSpec:
        known = self.dataclasses.get(cls)
        if known is not None:
            return known
        spec = _DataclassSpec(cls)
        self.dataclasses[cls] = spec
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # NameError and friends from forward references
            raise PayloadTypeError(f"{cls.__qualname__}: cannot resolve annotations: {exc}") from None
        plans = []
        for field in dataclasses.fields(cls):
            if not field.init:
                raise PayloadTypeError(f"{cls.__qualname__}.{field.name}: init=False fields cannot travel")
            field_spec, nullable = self.spec_for(hints[field.name], f"{cls.__qualname__}.{field.name}")
            has_default = field.default is not dataclasses.MISSING
            factory = field.default_factory if field.default_factory is not dataclasses.MISSING else None
            plans.append(
                _FieldPlan(
                    name=field.name,
                    tag=self.prefix + field.name,
                    spec=field_spec,
                    nullable=nullable,
                    required=not has_default and factory is None,
                    default=field.default if has_default else None,
                    default_factory=factory,
                )
            )
        spec.fields = tuple(plans)
        spec.compile(fast=self.fast)
        return spec


XS = "http://www.w3.org/2001/XMLSchema"


class _SchemaWriter:
    """Accumulates named XSD types while specs describe themselves."""

    def __init__(self, target_namespace: str | None) -> None:
        nsmap = {"xs": XS, "tns": target_namespace} if target_namespace else {"xs": XS}
        self.root = etree.Element(f"{{{XS}}}schema", nsmap=nsmap)
        if target_namespace:
            self.root.set("targetNamespace", target_namespace)
        self.root.set("elementFormDefault", "qualified" if target_namespace else "unqualified")
        self.names: dict[int, str] = {}
        self.taken: set[str] = set()

    def _name_for(self, key: object, hint: str) -> tuple[str, bool]:
        existing = self.names.get(id(key))
        if existing is not None:
            return existing, False
        base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in hint)
        name, counter = base, 1
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.names[id(key)] = name
        self.taken.add(name)
        return name, True

    def _prefixed(self, name: str) -> str:
        return f"tns:{name}" if self.root.get("targetNamespace") else name

    def complex_type(self, spec: _DataclassSpec) -> str:
        name, new = self._name_for(spec, f"{spec.cls.__qualname__}_Type")
        if new:
            complex_type = etree.SubElement(self.root, f"{{{XS}}}complexType", name=name)
            sequence = etree.SubElement(complex_type, f"{{{XS}}}sequence")
            for plan in spec.fields:
                element = etree.SubElement(sequence, f"{{{XS}}}element", name=plan.name)
                element.set("type", plan.spec.xsd_type(self))
                if not plan.required or plan.nullable:
                    element.set("minOccurs", "0")
                if plan.nullable:
                    element.set("nillable", "true")
        return self._prefixed(name)

    def enum_type(self, spec: _EnumSpec) -> str:
        name, new = self._name_for(spec.enum_cls, f"{spec.enum_cls.__qualname__}_Enum")
        if new:
            simple = etree.SubElement(self.root, f"{{{XS}}}simpleType", name=name)
            restriction = etree.SubElement(simple, f"{{{XS}}}restriction", base="xs:string")
            for text in spec.by_text:
                etree.SubElement(restriction, f"{{{XS}}}enumeration", value=text)
        return self._prefixed(name)

    def list_type(self, spec: _ListSpec) -> str:
        name, new = self._name_for(spec, f"List_{len(self.names)}")
        if new:
            complex_type = etree.SubElement(self.root, f"{{{XS}}}complexType", name=name)
            sequence = etree.SubElement(complex_type, f"{{{XS}}}sequence")
            item = etree.SubElement(sequence, f"{{{XS}}}element", name=ITEM, minOccurs="0", maxOccurs="unbounded")
            item.set("type", spec.item.xsd_type(self))
            if spec.item_nullable:
                item.set("nillable", "true")
        return self._prefixed(name)


T = TypeVar("T")


class PayloadCodec(typing.Generic[T]):
    """The XML contract of one payload class: its tag, its schema, and both directions."""

    cls: type[T]
    tag: str
    xml_name: str
    namespace: str | None

    def __init__(self, cls: type[T]) -> None:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise PayloadTypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self.xml_name = getattr(cls, "__xml_name__", None) or cls.__name__
        self.namespace = getattr(cls, "__xml_namespace__", None)
        self.tag = f"{{{self.namespace}}}{self.xml_name}" if self.namespace else self.xml_name
        self._spec = _TypeAnalyzer(f"{{{self.namespace}}}" if self.namespace else "").dataclass_spec(cls)
        self.xsd = self._derive_xsd()
        self.schema = etree.XMLSchema(etree.fromstring(self.xsd))

    def _derive_xsd(self) -> bytes:
        writer = _SchemaWriter(self.namespace)
        root_type = self._spec.xsd_type(writer)
        element = etree.Element(f"{{{XS}}}element", name=self.xml_name, type=root_type)
        writer.root.insert(0, element)
        return etree.tostring(writer.root, pretty_print=True)

    def to_element(self, payload: T) -> etree._Element:
        """Build the payload element; raises PayloadTypeError on a value that does not fit."""
        if self.namespace:
            element = etree.Element(self.tag, nsmap=typing.cast(dict[str, str], {None: self.namespace}))
        else:
            element = etree.Element(self.tag)  # without an nsmap argument: a quarter of a microsecond less
        self._spec.write(element, payload, self.xml_name)
        return element

    def to_bytes(self, payload: T) -> bytes:
        return etree.tostring(self.to_element(payload))

    def validate(self, element: etree._Element) -> str | None:
        """Validate ``element`` against the derived schema; the first error, or None."""
        if self.schema.validate(etree.ElementTree(element)):
            return None
        return schema_error(self.schema)

    def from_element(self, element: etree._Element) -> T:
        """Build the dataclass from an element that already passed :meth:`validate`."""
        try:
            return typing.cast(T, self._spec.read(element))
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadDecodeError(f"<{self.xml_name}>: {exc}") from None

    def from_bytes(self, data: bytes, limits: XmlLimits | None = None) -> T:
        """Parse (under ``limits``), validate and decode a standalone payload document.

        Raises XmlRejected for bytes beyond the limits, PayloadDecodeError for a
        payload that breaks the schema.
        """
        element = parse_untrusted(data, limits)
        problem = self.validate(element)
        if problem is not None:
            raise PayloadDecodeError(problem)
        return self.from_element(element)


_codec_cache: dict[type, PayloadCodec[Any]] = {}


def codec_for(cls: type[T]) -> PayloadCodec[T]:
    """The cached codec of ``cls``; building one compiles a schema, so do it once."""
    codec = _codec_cache.get(cls)
    if codec is None:
        codec = PayloadCodec(cls)
        _codec_cache[cls] = codec
    return codec


def payload_type_name(cls: type) -> str:
    """The importable name under which history records a payload's class."""
    return f"{cls.__module__}:{cls.__qualname__}"

"""The messages and handlers the benchmarks push through the pump."""

from __future__ import annotations

from dataclasses import dataclass, field

from xml_pipeline import HandlerMetadata, HandlerResponse


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int
    price: float


@dataclass(frozen=True)
class Order:
    """About 1 KB as an envelope: a realistic integration message."""

    order_id: str
    customer: str
    email: str
    street: str
    city: str
    country: str
    priority: int
    express: bool
    note: str
    lines: list[Line] = field(default_factory=list)


@dataclass(frozen=True)
class Receipt:
    order_id: str
    total: float
    lines: int


@dataclass(frozen=True)
class Greeting:
    """The payload of the shared floor's 233 B envelope (../shared/bench/lxml_floor.py),
    so the pump can be held to that floor on a message of the same shape."""

    name: str
    count: int


@dataclass(frozen=True)
class Reply:
    text: str


@dataclass(frozen=True)
class Work:
    """CPU work for the process-pool benchmark: ``rounds`` of pure-Python arithmetic."""

    rounds: int


@dataclass(frozen=True)
class Done:
    value: int


def sample_order(index: int = 0) -> Order:
    return Order(
        order_id=f"ORD-{index:08d}",
        customer="Ada Lovelace & Co. <engines>",
        email="ada@example.org",
        street="12 Analytical Engine Lane",
        city="London",
        country="GB",
        priority=3,
        express=True,
        note="Deliver to the side door; ring twice. " * 4,
        lines=[Line(f"SKU-{n:05d}", n + 1, 9.99 + n) for n in range(8)],
    )


async def receipt(payload: Order, metadata: HandlerMetadata) -> HandlerResponse:
    total = sum(line.quantity * line.price for line in payload.lines)
    return HandlerResponse.respond(Receipt(payload.order_id, round(total, 2), len(payload.lines)))


async def relay(payload: Order | Receipt, metadata: HandlerMetadata) -> HandlerResponse:
    """An order on to ``orders``, its receipt back to the caller: three hops per conversation, not one."""
    if isinstance(payload, Order):
        return HandlerResponse(payload, to="orders")
    return HandlerResponse.respond(payload)


async def greet(payload: Greeting, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Reply(f"hello {payload.name} x{payload.count}"))


def burn(rounds: int) -> int:
    value = 0
    for step in range(rounds):
        value = (value * 31 + step) & 0xFFFFFFFF
    return value


async def crunch(payload: Work, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Done(burn(payload.rounds)))

"""The agent's tools and the order data they work on.

Orders live in ``data/orders.json`` (``{"orders": [{"order_id": "A-1001", "item": ..., "total": 39.9, "status":
"delivered"}, ...]}``; totals in US dollars). The two tools the model can call:

* ``lookup_order(order_id)`` -> the order (a dict), or :class:`OrderNotFound`;
* ``refund_order(order_id, amount)`` -> ``{"refund_id", "order_id", "amount", "status": "refunded"}``, or
  :class:`OrderNotFound` / :class:`RefundRefused` (not delivered yet, amount not in ``(0, total - refunded]``).

Refunds are kept in memory for the process: one harness run is one conversation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("data") / "orders.json"


class OrderError(Exception):
    """A tool failed; the agent reports it back to the model."""


class OrderNotFound(OrderError):
    pass


class RefundRefused(OrderError):
    pass


def normalize_order_id(raw: str) -> str:
    """The store's form of an order id as customers type it: spaces and a leading ``#`` removed, the missing dash
    added (``"#A1002 "`` -> ``"A-1002"``)."""
    order_id = raw.strip().lstrip("#")
    if order_id and "-" not in order_id:
        order_id = f"{order_id[0]}-{order_id[1:]}"
    return order_id


class OrderStore:
    """Orders by id; ``refunds`` lists the refunds made by this process."""

    def __init__(self, orders: list[dict[str, Any]]) -> None:
        self._orders = {o["order_id"]: dict(o, refunded=o.get("refunded", 0.0)) for o in orders}
        self.refunds: list[dict[str, Any]] = []

    @classmethod
    def load(cls, path: str | Path = DATA_FILE) -> "OrderStore":
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["orders"])

    def add(self, order: dict[str, Any]) -> bool:
        """Add an order the data file lacks (e.g. one a production trace recorded); ``False`` if it is known."""
        if order["order_id"] in self._orders:
            return False
        self._orders[order["order_id"]] = dict(order, refunded=order.get("refunded", 0.0))
        return True

    def lookup_order(self, order_id: str) -> dict[str, Any]:
        order = self._orders.get(normalize_order_id(order_id))
        if order is None:
            raise OrderNotFound(f"no order {order_id!r}")
        return copy.deepcopy(order)

    def refund_order(self, order_id: str, amount: float) -> dict[str, Any]:
        order = self._orders.get(normalize_order_id(order_id))
        if order is None:
            raise OrderNotFound(f"no order {order_id!r}")
        if order["status"] != "delivered":
            raise RefundRefused(f"order {order['order_id']} is {order['status']}, not delivered yet")
        left = round(order["total"] - order["refunded"], 2)
        if not 0 < amount <= left:
            raise RefundRefused(f"amount {amount} is not between 0 and the {left} left to refund")
        order["refunded"] = round(order["refunded"] + amount, 2)
        refund = {"refund_id": f"R-{order['order_id']}-{len(self.refunds) + 1}", "order_id": order["order_id"],
                  "amount": amount, "status": "refunded"}
        self.refunds.append(refund)
        return refund


#: The tools as the model sees them (OpenAI "tools" format).
TOOL_SCHEMAS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "lookup_order",
        "description": "Look an order up by its id (as the customer gave it). Returns item, total (USD) and status.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                       "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "refund_order",
        "description": "Refund a delivered order, fully or partly. amount in USD.",
        "parameters": {"type": "object",
                       "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
                       "required": ["order_id", "amount"], "additionalProperties": False}}},
]

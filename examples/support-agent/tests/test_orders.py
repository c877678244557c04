"""The tools and the order store."""

import pytest

from support_agent.orders import OrderNotFound, OrderStore, RefundRefused, normalize_order_id


@pytest.fixture
def store():
    return OrderStore.load()


@pytest.mark.parametrize("raw, canonical", [("A-1002", "A-1002"), ("#A-1002", "A-1002"), ("A1002", "A-1002"),
                                            (" #B2001 ", "B-2001")])
def test_order_ids_are_normalized(raw, canonical):
    assert normalize_order_id(raw) == canonical


def test_lookup_returns_the_order(store):
    order = store.lookup_order("A-1001")
    assert (order["item"], order["total"], order["status"]) == ("electric kettle", 39.9, "delivered")
    assert store.lookup_order("#A1003")["order_id"] == "A-1003"


def test_unknown_orders_are_not_found(store):
    with pytest.raises(OrderNotFound, match="Z-9999"):
        store.lookup_order("Z-9999")
    with pytest.raises(OrderNotFound):
        store.refund_order("Z-9999", 1.0)


def test_a_delivered_order_is_refunded_once_up_to_its_total(store):
    refund = store.refund_order("A-1002", 89.0)
    assert refund == {"refund_id": "R-A-1002-1", "order_id": "A-1002", "amount": 89.0, "status": "refunded"}
    assert store.lookup_order("A-1002")["refunded"] == 89.0
    with pytest.raises(RefundRefused, match="0 left"):
        store.refund_order("A-1002", 1.0)
    assert store.refunds == [refund]


def test_partial_refunds_add_up_and_never_exceed_the_total(store):
    store.refund_order("B-2001", 20.0)
    store.refund_order("B-2001", 34.0)
    with pytest.raises(RefundRefused):
        store.refund_order("B-2001", 0.01)


@pytest.mark.parametrize("order_id, amount, why", [("A-1003", 5.0, "shipped"), ("A-1001", 40.0, "39.9 left"),
                                                   ("A-1001", 0, "between 0")])
def test_refunds_are_refused_when_not_delivered_or_out_of_range(store, order_id, amount, why):
    with pytest.raises(RefundRefused, match=why):
        store.refund_order(order_id, amount)


def test_orders_from_a_seed_are_added_once(store):
    assert store.add({"order_id": "C-3001", "item": "lamp", "total": 12.0, "status": "delivered"})
    assert not store.add({"order_id": "A-1001", "item": "other", "total": 1.0, "status": "delivered"})
    assert store.lookup_order("C-3001")["item"] == "lamp"
    assert store.lookup_order("A-1001")["item"] == "electric kettle"

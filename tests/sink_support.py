"""Batches for the sink tests (local log and Kafka): records that identify themselves."""

from sinks.base import SIGNAL_TRACES, Batch, Record


def make_batch(batch_id: int, records: int, *, value_size: int = 64, source_id: str = "test-source") -> Batch:
    """A batch whose records identify themselves: key = batch id and record index, value starts with both."""
    return Batch(
        records=[
            Record(
                key=f"{batch_id:016x}{i:016x}".encode(),
                value=f"{batch_id}:{i}:".encode().ljust(value_size, b"."),
                signal=SIGNAL_TRACES,
                item_count=1,
            )
            for i in range(records)
        ],
        source_id=source_id,
        received_at_ns=1_700_000_000_000_000_000 + batch_id,
    )

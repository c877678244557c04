"""Where data leaves trace-source: the Kafka producer and the embedded durable log.

The receiver hands per-trace OTLP batches (:class:`sinks.base.Record`) to a :class:`sinks.base.Sink`;
a sink returns only once the batch is durable. Nothing in this package imports the receiver or the pipeline.
"""

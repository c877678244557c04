"""OTLP receiver: OTLP/HTTP (aiohttp) and OTLP/gRPC (grpc.aio) servers.

Decode -> validate -> authenticate -> split by trace id -> hand per-trace batches to a sink (``sinks``).
Knows nothing about Kafka; imports flow receiver -> sinks only.
"""

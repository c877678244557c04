"""Stages that consume per-trace batches: the bus interface (Kafka and local), the assembler, and later the
grade/reproduce/fix stages.

Imports flow pipeline -> normalizers and pipeline -> sinks; the receiver never imports this package.
"""

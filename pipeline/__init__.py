"""Stages that consume per-trace batches: the bus interface, the assembler, grade/reproduce/fix.

Filled in by later issues; the receiver does not import this package.
"""

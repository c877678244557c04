"""Thin core of trace-source: CLI, settings and logging. It launches and observes; it never orchestrates."""

__version__ = "0.1.0"

"""Pulled trace sources and client-side uploads (seed-system.md "Trace sources"): a registry of sources
(:mod:`.store`), their configuration (:mod:`.config`), readers for files, Langfuse and Postgres / Supabase tables
(:mod:`.readers`, :mod:`.postgres`), the importer that turns what they read into envelopes on
``trace-source.traces`` once per content (:mod:`.importer`), ``sync`` / ``watch`` / ``test`` (:mod:`.sync`), the
upload client for a receiver's ``POST /v1/envelopes`` (:mod:`.upload`) and the local loop (:mod:`.autoloop`).
The pure conversions live in ``normalizers`` (``trace_files``, ``rows``, ``langfuse_api``, ``foreign``).
"""

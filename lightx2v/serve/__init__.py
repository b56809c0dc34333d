"""The generation service: ``lightx2v serve`` (or ``python -m lightx2v.server``), an HTTP API over a durable task
queue with progress, cancel, limits and batching. See docs/serve.md.

Modules: :mod:`.app` (FastAPI routes), :mod:`.schemas` (requests, settings, errors), :mod:`.queue` (SQLite WAL),
:mod:`.worker` (runs the tasks), :mod:`.files` (the data folder), :mod:`.metrics` (Prometheus text),
:mod:`.client` (a Python client and ``lightx2v submit``), :mod:`.cli` (the sub-commands). Importing this package
imports none of them (FastAPI is an optional dependency: ``pip install 'lightx2v[serve]'``).
"""

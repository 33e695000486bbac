"""The grid: sweep spec, expansion into cells, submission, state, status, collection.

Modules follow the data flow (docs/architecture.md): spec -> cells -> submit ->
ledger (the sweep directory) -> status / collect. Nothing here imports torch,
transformers, mlflow or submitit at import time, so the CLI answers in about a second.
"""

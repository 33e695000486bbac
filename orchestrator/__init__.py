"""The grid: sweep spec, expansion into cells, submission, state, status, collection.

Sub-packages follow the data flow, imports pointing down only (docs/architecture.md,
checked by `lint-imports`): cli -> launch -> (jobs) -> results -> state -> ledger ->
tracking | sweep. Nothing here imports torch, transformers, mlflow or submitit at import
time, so the CLI answers in about a second.
"""

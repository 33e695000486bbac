"""The sweep file and what it expands into: schema and loading (spec), cluster profiles, cells.

Bottom of the orchestrator: imports nothing else of it, and no torch or mlflow.
"""

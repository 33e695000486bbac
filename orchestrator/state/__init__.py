"""Where every cell stands: the scheduler (one batched sacct) joined with the sweep directory.

Below launch and results, which both ask it; imports no torch or mlflow.
"""

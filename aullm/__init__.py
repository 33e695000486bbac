"""The science of AU-LLM: data, model, loss, metrics and the training of one cell.

Nothing in this package knows about Slurm or MLflow.
"""

"""MLflow tracking. Orchestrator side (store, sync: may raise TrackingUnavailable) and job side
(cell_logger, spool: never raises). mlflow is imported inside functions only.
"""

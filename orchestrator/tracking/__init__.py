"""MLflow tracking for the grid: one MLflow run per cell, never the only copy of anything.

The sweep directory is the ledger (DESIGN.md §3); MLflow is for people. So:

* Tracking must never kill training. `CellRunLogger` wraps every MLflow call; on the first
  failure (server down, sqlite locked after MLflow's 20 s busy timeout, ...) it goes offline
  for the rest of the cell and appends what it could not send to
  ``<sweep>/tracking-spool/<cell_id>.jsonl``. `sync_spool` replays those files later.
* A run left RUNNING by a killed job is not believed: `reconcile_runs` closes it from the
  scheduler's view of the cell.
Modules: `config` (settings, tags, redaction; both sides), `store` and `sync` (orchestrator
side: may raise `TrackingUnavailable`), `spool` and `cell_logger` (job side: never raises).

* ``mlflow`` is imported inside functions only: ``aullm-grid status`` imports the orchestrator
  and must not pay the ~3 s import.

Orchestrator-side functions (`prepare_store`, `sync_spool`, `reconcile_runs`,
`find_runs_by_cell`) raise `TrackingUnavailable` when the store cannot be reached, so the
caller decides whether that matters; the job-side `CellRunLogger` never raises for it.

Runs of one sweep are found by the tag ``aullm.sweep_uid`` (a random id kept in
``<sweep>/mlflow/tracking.json``), not by the sweep's path, so several sweeps can share one
experiment on a shared server and a sweep directory can be moved or reached via symlinks.

Each group (dataset, LLM, variant) gets its parent run before its cells train
(`ensure_group_runs`, called by submit; ids kept in tracking.json), so a cell run is
created under its parent and the job records both ids in the cell's result file: the
collector then attaches 10,000 cell runs without one MLflow call per run.
"""


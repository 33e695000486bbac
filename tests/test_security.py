"""Security (issue 5.6) on the real dev Slurm cluster.

Job folders hold pickled callables (a pickle is code): they and `jobs/` itself are
readable by their owner only (0700). Secrets given to `submit` through the environment
(MLflow credentials, a hub token) reach the jobs, as submitit copies the environment,
but never appear in anything written: logs, results, manifest, the MLflow store,
artifacts, tables, nor in what `status` and `collect` print.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import CLI_ENV, GridAssets, REPO, shared_assets, sweep_dict, wait_all_finished
from tests.slurm_cluster import ClusterInfo, dev_slurm  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cli(env: dict[str, str], *args: str, timeout_s: float = 300) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=timeout_s,
        env=env, cwd=str(REPO), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_job_folders_private_and_secrets_written_nowhere(
    dev_slurm: ClusterInfo, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path  # noqa: F811
) -> None:
    import yaml

    assets: GridAssets = shared_assets(tmp_path_factory)
    spec = sweep_dict(
        assets, output_dir=tmp_path / "out", name=f"security-{secrets.token_hex(3)}", executor="slurm",
        cells_per_task=3, array_parallelism=1, epochs=2, mem="1500M", cross_domain_variants=(),
    )  # fmt: skip
    spec["grid"] = [{"protocol": "loso", "datasets": ["casme2"], "variants": ["no_llm"]}]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    values = {
        "MLFLOW_TRACKING_PASSWORD": f"s3cr3t-{secrets.token_hex(8)}",
        "MLFLOW_TRACKING_TOKEN": f"tok-{secrets.token_hex(8)}",
        "HF_TOKEN": f"hf_{secrets.token_hex(12)}",
    }
    env = {**os.environ, **CLI_ENV, **values, "MLFLOW_TRACKING_USERNAME": "aullm-test-user"}
    t0 = time.monotonic()
    code, submit_out = _cli(env, "submit", str(sweep_file), "--json")
    assert code == 0, submit_out
    try:
        final = wait_all_finished(tmp_path / "out", timeout_s=300)
        assert final["all_done"], final
        code, status_out = _cli(env, "status", str(sweep_file))
        assert code == 0, status_out
        code, status_json_out = _cli(env, "status", str(sweep_file), "--json")
        assert code == 0, status_json_out
        code, collect_out = _cli(env, "collect", str(sweep_file))
        assert code == 0, collect_out
    finally:
        _cli(env, "cancel", str(sweep_file), timeout_s=60)

    out = tmp_path / "out"
    # 0700: jobs/ and every job folder in it (pickles, sbatch scripts, logs)
    jobs = out / "jobs"
    folders = [jobs, *(p for p in jobs.iterdir() if p.is_dir())]
    assert len(folders) >= 3  # jobs/, the array task(s), the collector
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, (folder, oct(folder.stat().st_mode))
    pickles = list(jobs.rglob("*.pkl"))
    assert pickles and all(p.parent.stat().st_mode & 0o077 == 0 for p in pickles)

    # the secrets: nowhere in the sweep directory (text or binary), nor in anything printed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_log.out") for p in files) and any(p.suffix == ".db" for p in files)
    for name, value in values.items():
        needle = value.encode()
        leaks = [str(p) for p in files if needle in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
        for what, text in (("submit", submit_out), ("status", status_out), ("status --json", status_json_out),
                           ("collect", collect_out)):  # fmt: skip
            assert value not in text, f"{name} printed by {what}"
    print(f"\n[timing] security sweep: {time.monotonic() - t0:.1f} s; {len(files)} files checked")

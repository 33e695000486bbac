"""The sweep cost report of `aullm-grid status`: hours spent and left, from measured cell times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.launch.prepare import prepare
from orchestrator.ledger import SweepDir
from orchestrator.state.status import CellStatus, cost_line, cost_report, devices_per_task, measured_seconds

GPU2 = {"executor": "slurm", "gres": "gpu:h100:2", "cpus_per_task": 8}


def st(cid: str, group: str, state: str) -> CellStatus:
    return CellStatus(cid, group, state)


def test_devices_per_task() -> None:
    assert devices_per_task({"gpus_per_node": 4, "gres": "gpu:h100:2"}) == (4, "GPU")  # the explicit count wins
    assert devices_per_task({"gres": "gpu:h100:2"}) == (2, "GPU")
    assert devices_per_task({"gres": "gpu:a100:1,gpu:h100:2"}) == (3, "GPU")
    assert devices_per_task({"gres": "gpu"}) == (1, "GPU")
    assert devices_per_task({"gres": "shard:4", "cpus_per_task": 3}) == (3, "CPU")
    assert devices_per_task({"executor": "local"}) == (1, "CPU")
    assert devices_per_task({"executor": "local", "cpus_per_task": 2, "processes_per_task": 3}) == (6, "CPU")


def test_measured_seconds_prefers_the_task_wall_time() -> None:
    assert measured_seconds({"started_at": 100.0, "finished_at": 160.5, "cell_seconds": 50.0}) == 60.5
    assert measured_seconds({"finished_at": 160.0, "cell_seconds": 50.0}) == 50.0  # no start: the trainer's time
    assert measured_seconds({"started_at": 200.0, "finished_at": 100.0, "cell_seconds": 7}) == 7.0  # clock went back
    assert measured_seconds({"status": "failed", "finished_at": 3.0}) is None
    assert measured_seconds({"started_at": "x", "finished_at": True}) is None


def test_spent_and_left_by_hand() -> None:
    # group a: two measured cells (60 s and 90 s -> mean 75 s), two cells left
    # group b: same LLM and variant on another dataset, nothing measured -> 75 s (the llm/variant mean)
    # group c: other LLM, nothing measured -> the sweep mean, (60 + 90 + 30) / 3 = 60 s
    # group d: no_llm, one measured cell of 30 s
    statuses = [
        st("a1", "casme2/qwen/all", "done"),
        st("a2", "casme2/qwen/all", "done"),
        st("a3", "casme2/qwen/all", "pending"),
        st("a4", "casme2/qwen/all", "failed"),
        st("b1", "samm/qwen/all", "running"),
        st("c1", "casme2/deepseek/all", "not_submitted"),
        st("d1", "casme2/none/no_llm", "done"),
        st("d2", "casme2/none/no_llm", "done"),  # done but no time in its result: not measured
    ]
    results = {
        "a1": {"status": "done", "started_at": 1000.0, "finished_at": 1060.0},
        "a2": {"status": "done", "cell_seconds": 90.0},
        "a4": {"status": "failed", "error": "boom", "finished_at": 5.0},
        "d1": {"status": "done", "started_at": 0.0, "finished_at": 30.0},
        "d2": {"status": "done"},
    }
    cost = cost_report(statuses, results, GPU2)
    assert cost["unit"] == "GPU-hours" and cost["devices_per_task"] == 2
    assert cost["measured_cells"] == 3
    assert cost["spent_hours"] == pytest.approx((60 + 90 + 30) * 2 / 3600, abs=1e-4)  # 0.1 GPU-hours
    assert cost["mean_cell_seconds"] == pytest.approx(60.0)
    assert cost["remaining_cells"] == 4
    left_s = 75 + 75 + 75 + 60  # a3, a4 (group mean); b1 (llm/variant mean); c1 (sweep mean)
    assert cost["remaining_hours"] == pytest.approx(left_s * 2 / 3600, abs=1e-4)
    assert cost["estimated_from"] == {"group": 2, "llm_variant": 1, "sweep": 1}
    line = cost_line(cost)
    assert line.startswith("cost: 0.10 GPU-hours spent on 3 measured cells (2 GPUs per task)")
    assert "about 0.16 GPU-hours left for 4 cells (2 from their group, 1 from their LLM/variant, 1 from the sweep mean)" in line


def test_nothing_measured_yet_and_nothing_left() -> None:
    pending = cost_report([st("a", "g/l/v", "pending")], {}, {"executor": "local", "cpus_per_task": 2})
    assert pending["unit"] == "CPU-hours" and pending["spent_hours"] == 0
    assert pending["remaining_cells"] == 1 and pending["remaining_hours"] is None
    assert "no finished cell yet" in cost_line(pending)
    done = cost_report([st("a", "g/l/v", "done")], {"a": {"started_at": 0, "finished_at": 1800}},
                       {"executor": "local", "cpus_per_task": 2})  # fmt: skip
    assert done["spent_hours"] == pytest.approx(1.0) and done["remaining_hours"] == 0
    assert cost_line(done) == "cost: 1.00 CPU-hours spent on 1 measured cells (2 CPUs per task); nothing left"


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validated sweep file (real synthetic sheets) whose directory has a manifest and no submission."""
    root = tmp_path_factory.mktemp("cost")
    assert cli.main(["data", "synth", "--layout", "casme2", "--out", str(root / "casme2"),
                     "--subjects", "3", "--clips-per-subject", "1"]) == 0  # fmt: skip
    model = root / "tiny"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cost",
        "output_dir": "out",
        "datasets": {"casme2": {"root": str(root / "casme2")}},
        "llms": {"tiny": {"path": str(model)}},
        "grid": [{"datasets": ["casme2"], "variants": ["all"]}],
        "resources": {"executor": "slurm", "gpus_per_node": 1},
    }))
    spec, _subjects, cells = prepare(str(path))
    sweep = SweepDir(spec.output_dir)
    sweep.write_manifest(spec, cells)
    first, second = cells[0].cell_id, cells[1].cell_id
    # results as jobs/run_cells writes them: started_at/finished_at and the trainer's timing
    sweep.write_result(first, {"status": "done", "started_at": 100.0, "finished_at": 145.0,
                               "predictions": {"probs": [[0.1]]}, "timing": {"cell_seconds": 40.0}})  # fmt: skip
    sweep.write_result(second, {"status": "done", "started_at": 200.0, "finished_at": 275.0,
                                "predictions": {"probs": [[0.1]]}, "timing": {"cell_seconds": 70.0}})  # fmt: skip
    return path


def test_status_json_and_text_show_the_cost(sweep_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", str(sweep_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["done"] == 2 and summary["counts"]["not_submitted"] == 1
    cost = summary["cost"]
    # 45 s + 75 s on 1 GPU (not the trainer's 40 + 70 s); the third cell at the group's mean, 60 s
    assert cost["spent_hours"] == pytest.approx(120 / 3600, abs=1e-4)
    assert cost["remaining_hours"] == pytest.approx(60 / 3600, abs=1e-4)
    assert cost["measured_cells"] == 2 and cost["remaining_cells"] == 1 and cost["unit"] == "GPU-hours"
    assert cli.main(["status", str(sweep_file)]) == 0
    out = capsys.readouterr().out
    assert "cost: 0.03 GPU-hours spent on 2 measured cells (1 GPU per task); about 0.02 GPU-hours left for 1 cells" in out

"""A real browser's look at the MLflow UI: the compare view of a sweep's parent runs.

    .venv/bin/python docs/mlflow_screenshot.py runs/demo docs/img/mlflow_compare_demo.png

starts `mlflow server` on the sweep's embedded store (a free local port), finds the parent
runs (tag `aullm.kind = group`), opens the compare view in headless Chromium and saves a
screenshot. Needs Chromium (`apt-get install chromium`); without one it says so and exits
with 3. tests/test_mlflow_records.py uses `find_browser`, `compare_url` and `render` on a
real server. Running as root, Chromium needs --no-sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the compare view is a React page: let its scripts run this long (virtual time) before the
# DOM is read or the picture taken
RENDER_BUDGET_MS = 30000


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def compare_url(server: str, experiment_id: str, run_ids: list[str]) -> str:
    quote = urllib.parse.quote
    return (f"{server.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
            f"&experiments={quote(json.dumps([experiment_id]))}")  # fmt: skip


def render(browser: str, url: str, *, screenshot: Path | None = None, size: tuple[int, int] = (1400, 1800),
           timeout_s: float = 180) -> str:  # fmt: skip
    """The page's DOM after its scripts ran; with `screenshot`, also a PNG of it."""
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--virtual-time-budget={RENDER_BUDGET_MS}", f"--window-size={size[0]},{size[1]}"]  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s, check=True)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout_s, check=True)
    return dom.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sweep, out = Path(argv[0]).resolve(), Path(argv[1])
    browser = find_browser()
    if browser is None:
        print("no Chromium found (apt-get install chromium); no screenshot taken", file=sys.stderr)
        return 3
    db = sweep / "mlflow" / "mlflow.db"
    if not db.is_file():
        print(f"{db}: no embedded MLflow store; run the sweep and `aullm-grid collect` first", file=sys.stderr)
        return 2
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        from mlflow import MlflowClient

        state = json.loads((sweep / "mlflow" / "tracking.json").read_text())
        exp_id = next(iter(state["experiments"].values()))
        parents = MlflowClient(uri).search_runs([exp_id], filter_string="tags.\"aullm.kind\" = 'group'")
        render(browser, compare_url(uri, exp_id, [r.info.run_id for r in parents]), screenshot=out)
        print(f"{out}: the compare view of {len(parents)} parent runs")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

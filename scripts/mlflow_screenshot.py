"""Screenshot of the MLflow UI comparing the latest training run of every backbone.

Needs Debian's `chromium` (apt-get install chromium), `pip install -e '.[docs]'` (Playwright,
driving that Chromium; it downloads no browser) and a `dvc repro` already run.

    python scripts/mlflow_screenshot.py docs/img/mlflow-compare.png

It starts `mlflow server` on a free loopback port against the project's database, opens the
experiment's chart view of the runs that trained the checkpoints in models/, in
MLflow's classic "model training" mode rather than the GenAI one, closes the assistant panel,
keeps the charts a user compares (validation AUC and loss per epoch, training loss, test AUC)
and saves a PNG. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pneumo.mlops import tracking
from pneumo.records import ModelCard

CHARTS = "^(val_auc|val_loss|train_loss|test_roc_auc)$"  # MLflow's chart search takes a regex
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("mlflow server did not start") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"))
    parser.add_argument("--size", default="1500,1180", help="Window width,height.")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    run_ids = [
        tracking.training_run_of(ModelCard.weights(folder))
        for folder in sorted(Path("models").glob("*"))
        if ModelCard.weights(folder).is_file()
    ]
    if not run_ids or None in run_ids or not args.db.is_file():
        raise SystemExit("no trained models or no mlflow.db: run `dvc repro` first")

    import mlflow
    from playwright.sync_api import sync_playwright

    mlflow.set_tracking_uri(f"sqlite:///{args.db.resolve()}")
    (experiment_id,) = {mlflow.get_run(r).info.experiment_id for r in run_ids}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{args.db.resolve()}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_healthy(base, server)
        query = urllib.parse.urlencode(
            {
                "compareRunsMode": "CHART",
                "workflowType": "machine_learning",
                "searchFilter": f"attributes.run_id IN ({', '.join(map(repr, run_ids))})",
            }
        )
        url = f"{base}/#/experiments/{experiment_id}/runs?{query}"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        width, height = (int(n) for n in args.size.split(","))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.get_by_placeholder("Search metric charts").fill(CHARTS)
            close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close.count():
                close.click()
            page.wait_for_timeout(3000)
            page.screenshot(path=str(args.output))
            browser.close()
        print(f"{args.output} ← {url}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

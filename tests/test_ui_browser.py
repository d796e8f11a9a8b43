"""The MLflow UI in a real headless browser: a logged ablation opens on its runs table with the metrics in view.

`mlflow ui` serves a React app, so the page is checked as chromium renders it (`--dump-dom` after the app has
fetched the runs), not as the server sends it. Skipped where no `chromium` is installed; CI installs it.
"""

import html
import json
import re
import shutil
import subprocess

import pytest

from samrepro import results
from samrepro.results import StepResult
from tests.servers import mlflow_process

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (CI installs Debian's chromium)"),
]
DATA = "synthetic-val(seed=0, n=4)"
ENV = {"torch": "2.11.0", "data": DATA}
PLAN = {"plan": {"name": "blog", "steps": []}, "mode": "cumulative", "model": "tiny", "device": "cpu"}


def step(index, name, patches, start, end, **kw):
    base = dict(model="tiny", device="cpu", batch_size=2, step=name, index=index, patches=patches, status="ok")
    times = dict(started_at=f"2026-01-05T10:{start}+00:00", finished_at=f"2026-01-05T10:{end}+00:00")
    return StepResult(**(base | dict(gate="pass", weights="random(seed=0)", plan="blog", env=ENV) | times | kw))


def write_results(folder):
    for r in [
        step(0, "fp32", [], "00:00", "02:00", gate="skipped", img_s=12.5, peak_mem_mib=512.0, miou_gt=0.625),
        step(1, "bf16", ["bf16"], "02:00", "03:30", img_s=31.25, peak_mem_mib=300.0, miou_agreement=0.9375),
        step(2, "compile", ["bf16", "compile"], "03:30", "09:00", img_s=50.0, compile_s=301.5, gate="fail"),
    ]:
        results.write(r, folder)
    (folder / "plan.json").write_text(json.dumps(PLAN | {"data": "synthetic"}))
    return folder


def rendered_text(url, profile):
    """The page's text once chromium has run the app (virtual time lets its requests and timers finish)."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=2400,1200",  # the runs table renders only the columns in view
        "--virtual-time-budget=30000",
        "--dump-dom",
        url,
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_experiment_opens_on_runs_with_metrics(tmp_path):
    from samrepro.tracking import log_results_dir, ui_address

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    res = write_results(tmp_path / "res")
    # ready once a store query answers, so the server's tables exist before logging writes there
    ready = "/api/2.0/mlflow/experiments/search?max_results=1"
    with mlflow_process("ui", ["--backend-store-uri", uri], tmp_path / "ui.log", ready) as url:
        log_results_dir(res, uri)
        address = ui_address(uri, int(url.rsplit(":", 1)[1]))
        assert address.startswith(f"{url}/#/experiments/")  # one experiment: its runs
        text = rendered_text(address, tmp_path / "chromium")
    assert "Runs - Experiment" in text, text[:2000]  # the runs tab, not the GenAI overview
    assert "blog cumulative" in text and "00 fp32" in text and "01 bf16" in text and "02 compile" in text
    header = text[text.index("Run Name") : text.index("00 fp32")]
    for column in ("img_s", "speedup", "peak_mem_mib", "miou_agreement", "miou_gt", "gate_pass", "compile_s"):
        assert column in header
    # bf16's row in the view's column order: img/s, speed-up over fp32, peak MiB, agreement, GT mIoU, gate 1/0,
    # compile seconds, gate tag
    assert "31.25 2.5 300 0.9375 - 1 - pass" in text, text[:3000]
    assert "301.5" in text and DATA in text  # compile's compile_s; the dataset column
    assert "9.0min" in text  # the parent's duration: 10:00 (fp32's start) to 10:09 (compile's end)

"""`pneumo app`: the page and its API, over real HTTP from a running server."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from pneumo.mlops.app import MAX_UPLOAD_MB, RESEARCH_ONLY
from tests.conftest import (
    BATCH_TOLERANCE,
    assert_calibrated_close,
    free_port,
    jpeg_bytes,
    tool_env,
)


@pytest.fixture(scope="module")
def app_url(tiny_project: Path) -> Iterator[str]:
    port = free_port()
    model = str(tiny_project / "models/resnet50")
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumo", "app", "--model", model, "--port", str(port)],
        cwd=tiny_project, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/model", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "pneumo app did not start"
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post(url: str, data: bytes, name: str = "scan.jpeg") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/api/predict", data=data, headers={"X-Filename": quote(name)}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_page_loads_nothing_from_elsewhere_and_says_research_only(app_url):
    with urllib.request.urlopen(app_url, timeout=10) as response:
        page = response.read().decode()
    assert RESEARCH_ONLY in page and "<script>" in page
    assert not re.search(r"(src|href)=|https?://|@import", page)  # inline only: works offline
    with urllib.request.urlopen(f"{app_url}/api/model", timeout=10) as response:
        model = json.loads(response.read())
    assert model | {"notice": RESEARCH_ONLY} == model
    assert (model["name"], model["backbone"], model["runtime"]) == ("resnet50", "resnet50", "torch")


def test_an_upload_gets_the_answer_predict_gives_and_its_grad_cam(app_url, tiny_project):
    expected = pd.read_csv(tiny_project / "reports/eval/resnet50/predictions.csv").iloc[0]
    image = tiny_project / "data/raw" / expected.image
    status, answer = _post(app_url, image.read_bytes(), image.name)
    assert status == 200, answer
    model = tiny_project / "models/resnet50"
    assert_calibrated_close(model, [answer["probability"]], expected.to_frame().T, BATCH_TOLERANCE)
    assert answer["label"] in ("NORMAL", "PNEUMONIA", "REFER")
    assert answer["in_distribution"] is True and answer["notice"] == RESEARCH_ONLY
    header, encoded = answer["figure"].split(",", 1)
    assert header == "data:image/png;base64"
    assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")


def test_noise_is_answered_without_a_label_and_with_the_reason(app_url):
    status, answer = _post(app_url, jpeg_bytes(0), "noise.jpeg")
    assert status == 200
    assert answer["label"] is None and answer["in_distribution"] is False
    assert "not a chest radiograph" in answer["reason"]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"%PDF-1.4 not an image", 422, "notes.pdf is not an image pneumo can read"),
        (b"", 400, "the upload is empty"),
        (b"\0" * (MAX_UPLOAD_MB * 2**20 + 1), 413, f"the limit is {MAX_UPLOAD_MB} MB"),
    ],
    ids=["not-an-image", "empty", "too-large"],
)
def test_wrong_uploads_get_a_message_not_a_stack_trace(app_url, data, status, message):
    found, answer = _post(app_url, data, "notes.pdf")
    assert found == status
    assert message in answer["error"] and "Traceback" not in answer["error"]


def test_a_file_name_in_any_script_and_a_body_without_length_are_answered(app_url):
    found, answer = _post(app_url, b"%PDF-1.4", "снимок 肺.pdf")  # the page quotes the name
    assert found == 422 and answer["error"].startswith("снимок 肺.pdf is not an image")
    request = urllib.request.Request(
        f"{app_url}/api/predict", data=b"x", headers={"Content-Length": "-5"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 411
    assert "Content-Length" in json.loads(refused.value.read())["error"]


# Root runs Chromium without its sandbox; no GPU, no network services that could stall a test
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def test_in_a_browser_an_upload_shows_the_answer_and_a_wrong_file_its_message(
    app_url, tiny_project, tmp_path
):
    """Debian's Chromium, headless, driven by Playwright: what a user sees on the page. The
    screenshots stay in the test's folder (docs/img/app.png is one of them)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    predictions = pd.read_csv(tiny_project / "reports/eval/resnet50/predictions.csv")
    expected = predictions[predictions.label == "PNEUMONIA"].iloc[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(app_url)
        expect(page.locator("#notice")).to_have_text(RESEARCH_ONLY)
        expect(page.locator("#model")).to_have_text(
            re.compile(r"^Model: resnet50 \(resnet50, \d+ px, torch\)$")
        )

        page.set_input_files("#file", tiny_project / "data/raw" / expected.image)
        page.click("button[type=submit]")
        expect(page.locator("#result .answer")).to_have_text(
            re.compile("^(NORMAL|PNEUMONIA|REFER: .*)$"), timeout=60_000
        )
        image = tiny_project / "data/raw" / expected.image
        answered = _post(app_url, image.read_bytes(), image.name)[1]["probability"]
        shown = page.locator("#result dd").first.inner_text()
        assert shown == f"{answered:.3f} (calibrated)"  # what the API answers for that file
        figure = page.locator("#result img")
        expect(figure).to_be_visible()
        assert figure.evaluate("image => image.complete && image.naturalWidth > 0")
        page.screenshot(path=tmp_path / "answer.png", full_page=True)

        page.set_input_files(
            "#file", files=[{"name": "notes.pdf", "mimeType": "application/pdf",
                             "buffer": b"%PDF-1.4 not an image"}],
        )  # fmt: skip
        page.click("button[type=submit]")
        expect(page.locator("#result .error")).to_have_text(
            re.compile("^notes.pdf is not an image pneumo can read")
        )
        expect(page.locator("#result .answer")).to_have_count(0)
        page.screenshot(path=tmp_path / "error.png", full_page=True)
        browser.close()
    assert (tmp_path / "answer.png").stat().st_size > 10_000

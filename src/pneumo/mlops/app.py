"""`pneumo app`: a page to try a model in a browser: upload a PNG, JPEG or DICOM file, see the
prepared image with its Grad-CAM overlay, the probability and the answer.

The server is the standard library's threading HTTP server and the page is one HTML file with
its styles and script inline: it loads nothing from the internet (it must work on an offline
ward machine) and needs no package beyond the pipeline's. One upload is answered at a time
(Grad-CAM hooks the shared network). Errors, a file too large or one that is not an image
come back as a message the page shows, never a stack trace.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from pneumo.core.runtime import Classifier
from pneumo.mlops.predict import Explanations

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 20
DISCARD_MB = 256  # an oversized upload up to this is read and dropped before the answer
RESEARCH_ONLY = "Research use only, not for diagnosis."


@dataclass(frozen=True)
class ModelIdentity:
    """What the page says the model is."""

    source: str  # the folder or models:/ URI
    name: str
    version: str | None
    alias: str | None


def identify(model: str) -> ModelIdentity:
    """A model folder, or a registry URI resolved to its version (``models:/name@alias`` or
    ``models:/name/version``)."""
    if not model.startswith("models:/"):
        return ModelIdentity(model, Path(model).name, None, None)
    from pneumo.mlops.registered import resolve

    version = resolve(model)
    alias = model.split("@", 1)[1] if "@" in model else None
    return ModelIdentity(model, version.name, str(version.version), alias)


class Answerer:
    """Turns one uploaded file into the page's JSON answer."""

    def __init__(self, classifier: Classifier, identity: ModelIdentity, workdir: Path) -> None:
        self.classifier, self.identity, self.workdir = classifier, identity, workdir
        self.lock = threading.Lock()

    def model(self) -> dict:
        card = self.classifier.card
        return {
            "name": self.identity.name,
            "version": self.identity.version,
            "alias": self.identity.alias,
            "source": self.identity.source,
            "backbone": card.backbone,
            "image_size": card.image_size,
            "runtime": self.classifier.runtime,
        }

    def answer(self, filename: str, data: bytes) -> tuple[HTTPStatus, dict]:
        name = Path(filename).name or "upload"
        if not data:
            return HTTPStatus.BAD_REQUEST, {"error": "the upload is empty: choose an image file"}
        # One upload at a time, in a folder of its own that goes with the answer.
        with self.lock, tempfile.TemporaryDirectory(dir=self.workdir) as folder:
            upload = Path(folder) / "upload" / name
            upload.parent.mkdir()
            upload.write_bytes(data)
            [row] = self.classifier.predict_files([upload])
            if "error" in row:
                return HTTPStatus.UNPROCESSABLE_ENTITY, {
                    "error": f"{name} is not an image pneumo can read "
                    f"(PNG, JPEG, BMP, TIFF or DICOM): {row['error']}"
                }
            figure = Explanations(self.classifier, Path(folder) / "figure").write(upload, row)
            picture = base64.b64encode(figure.read_bytes()).decode("ascii")
        row.pop("file")
        row["figure"] = f"data:image/png;base64,{picture}"
        return HTTPStatus.OK, row | {"model": self.model(), "notice": RESEARCH_ONLY}


def handler(answerer: Answerer, page: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pneumo-app"

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _discard(self, size: int) -> None:
            """Read an oversized body away so the client gets the answer, not a reset; past
            a bound the connection is closed instead."""
            if size > DISCARD_MB * 2**20:
                self.close_connection = True
                return
            while size > 0:
                size -= len(self.rfile.read(min(size, 2**20)) or b"\0" * size)

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif self.path == "/api/model":
                self._json(HTTPStatus.OK, answerer.model() | {"notice": RESEARCH_ONLY})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/predict":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
                return
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                self._json(
                    HTTPStatus.LENGTH_REQUIRED,
                    {"error": "send the file as the request body, with its Content-Length"},
                )
                return
            if size > MAX_UPLOAD_MB * 2**20:
                self._discard(size)
                self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"the file has {size / 2**20:.1f} MB; the limit is "
                     f"{MAX_UPLOAD_MB} MB"},
                )  # fmt: skip
                return
            filename = unquote(self.headers.get("X-Filename", "upload"))  # the page quotes it
            try:
                status, payload = answerer.answer(filename, self.rfile.read(size))
            except Exception:  # a bug must not show a stack trace on the page
                log.exception("answering %s failed", filename)
                status = HTTPStatus.INTERNAL_SERVER_ERROR
                payload = {"error": "pneumo failed on this file; the server's log says why"}
            self._json(status, payload)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def serve(classifier: Classifier, identity: ModelIdentity, host: str, port: int) -> None:
    """Serve the page until interrupted."""
    page = PAGE.replace("{{RESEARCH_ONLY}}", RESEARCH_ONLY).replace(
        "{{MAX_UPLOAD_MB}}", str(MAX_UPLOAD_MB)
    )
    with tempfile.TemporaryDirectory(prefix="pneumo-app-") as workdir:
        answerer = Answerer(classifier, identity, Path(workdir))
        with ThreadingHTTPServer((host, port), handler(answerer, page.encode())) as server:
            log.info("pneumo app on http://%s:%d (Ctrl-C stops it)", host, server.server_port)
            with contextlib.suppress(KeyboardInterrupt):
                server.serve_forever()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pneumo: try the model</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; color: #1b1b1b; }
.notice { background: #fff3cd; border: 1px solid #d6b656; padding: .6rem .9rem;
          font-weight: 600; }
.error { background: #fde2e1; border: 1px solid #c0392b; padding: .6rem .9rem; }
.answer { font-size: 1.6rem; font-weight: 700; margin: .6rem 0; }
.muted { color: #555; }
img { max-width: 100%; border: 1px solid #ccc; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; }
</style>
</head>
<body>
<h1>pneumo: try the model</h1>
<p class="notice" id="notice">{{RESEARCH_ONLY}}</p>
<p class="muted" id="model">Loading the model's description...</p>
<form id="form">
  <input type="file" id="file" accept=".png,.jpg,.jpeg,.bmp,.tif,.tiff,.dcm,image/*" required>
  <button type="submit">Predict</button>
  <span class="muted">PNG, JPEG, BMP, TIFF or DICOM, up to {{MAX_UPLOAD_MB}} MB</span>
</form>
<div id="result"></div>
<script>
const limit = {{MAX_UPLOAD_MB}} * 1024 * 1024;
const result = document.getElementById("result");
function text(tag, cls, value) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  node.textContent = value;
  return node;
}
function describe(model) {
  const parts = [model.name];
  if (model.version) parts.push("version " + model.version);
  if (model.alias) parts.push("@" + model.alias);
  return "Model: " + parts.join(" ") + " (" + model.backbone + ", " + model.image_size +
    " px, " + model.runtime + ")";
}
fetch("/api/model").then(r => r.json()).then(model => {
  document.getElementById("model").textContent = describe(model);
});
document.getElementById("form").addEventListener("submit", async event => {
  event.preventDefault();
  const file = document.getElementById("file").files[0];
  result.replaceChildren();
  if (!file) return;
  if (file.size > limit) {
    result.append(text("p", "error", file.name + " is larger than the " +
      "{{MAX_UPLOAD_MB}} MB limit"));
    return;
  }
  result.append(text("p", "muted", "Predicting " + file.name + "..."));
  let answer;
  try {
    const response = await fetch("/api/predict", {method: "POST", body: file,
      headers: {"X-Filename": encodeURIComponent(file.name)}});
    answer = await response.json();
  } catch (error) {
    answer = {error: "the server did not answer: " + error};
  }
  result.replaceChildren();
  if (answer.error) {
    result.append(text("p", "error", answer.error));
    return;
  }
  let label = answer.label === null ? "No label: not a chest radiograph as the model knows one"
    : answer.label === "REFER" ? "REFER: the model cannot decide this one; a reader should"
    : answer.label;
  result.append(text("p", "answer", label));
  const facts = document.createElement("dl");
  const rows = [["PNEUMONIA probability", answer.probability.toFixed(3) + " (calibrated)"],
    ["in distribution", answer.in_distribution ? "yes" : "no"],
    ["input-gate score", answer.gate_score.toFixed(3) + " (above 1: flagged)"]];
  if (answer.reason) rows.push(["why", answer.reason]);
  rows.push(["model", describe(answer.model)]);
  for (const [key, value] of rows) facts.append(text("dt", "", key), text("dd", "", value));
  result.append(facts);
  const figure = document.createElement("img");
  figure.src = answer.figure;
  figure.alt = "the prepared image and its Grad-CAM overlay";
  result.append(figure, text("p", "notice", answer.notice));
});
</script>
</body>
</html>
"""

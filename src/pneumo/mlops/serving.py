"""The registered MLflow model, logged from code ("models from code"), not as a pickle.

MLflow runs this file when it loads the model: it defines the model class and hands an
instance to :func:`mlflow.models.set_model`. What loading executes is therefore this file, the
pneumo modules shipped beside it (``pneumo.core.inference.SHIPPED_MODULES``) and the libraries in
the model's requirements; the weights are a state dict read with ``weights_only=True`` after
their SHA-256 (and the ONNX graph's) is checked against the one recorded at registration
(``model_config``). ``model_config={"runtime": "onnx" | "torch" | "auto"}`` picks what runs the
network (auto: ONNX Runtime when the folder has the graph and onnxruntime is installed).

Input: a DataFrame with an ``image`` column of base64-encoded image files (PNG, JPEG, …, or
DICOM with pydicom installed). Output: ``probability`` (of PNEUMONIA, averaged over the TTA
views, then calibrated); ``in_distribution``, ``gate_score`` and, for an input the input gate
flags, a ``reason``; and ``label``: none for a flagged input (unless the request's params say
``allow_ood: true``), REFER inside the validation-chosen referral band, else NORMAL or
PNEUMONIA at the validation-chosen threshold.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumo.core.inference import MODEL_ARTIFACT
from pneumo.core.runtime import load_classifier, verified_settings

OUTPUT_COLUMNS = ["probability", "label", "in_distribution", "gate_score", "reason"]


class PneumoniaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config
        folder = Path(context.artifacts[MODEL_ARTIFACT])
        expected = {"weights": config["weights_sha256"], "onnx": config.get("onnx_sha256")}
        # A registered version is checked whole, whichever runtime then reads which file.
        verified_settings(folder, expected, reads="all")
        self.classifier = load_classifier(
            folder,
            runtime=config.get("runtime", "auto"),
            device=config["inference_device"],
            expected=expected,
        )

    def _pixels(self, row: int, encoded: str) -> np.ndarray:
        try:
            return self.classifier.prepare(base64.b64decode(encoded, validate=True))
        except ValueError as exc:  # binascii.Error and ImageDecodeError are ValueErrors
            # One line, no traceback: the scoring server answers 400 with this message.
            raise MlflowException(
                f"row {row}: 'image' must be a base64-encoded image file ({exc})",
                error_code=INVALID_PARAMETER_VALUE,
            ) from None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if model_input.empty:
            return pd.DataFrame({column: [] for column in OUTPUT_COLUMNS})
        pixels = np.stack([self._pixels(i, item) for i, item in enumerate(model_input["image"])])
        allow_ood = bool((params or {}).get("allow_ood", False))
        decisions = [
            self.classifier.decide(float(p), float(score), allow_ood)
            for p, score in zip(*self.classifier.assess(pixels), strict=True)
        ]
        return pd.DataFrame(decisions, columns=OUTPUT_COLUMNS)


mlflow.models.set_model(PneumoniaModel())

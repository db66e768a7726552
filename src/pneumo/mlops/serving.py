"""The registered MLflow model, logged from code ("models from code"), not as a pickle.

MLflow runs this file when it loads the model: it defines the model class and hands an
instance to :func:`mlflow.models.set_model`. What loading executes is therefore this file, the
pneumo modules shipped beside it (``pneumo.core.inference.SHIPPED_MODULES``) and the libraries in
the model's requirements; the weights are a state dict read with ``weights_only=True`` after
their SHA-256 is checked against the one recorded at registration (``model_config``).

Input: a DataFrame with an ``image`` column of base64-encoded image files (PNG, JPEG, …, or
DICOM with pydicom installed). Output: ``probability`` (of PNEUMONIA, averaged over the TTA
views, then calibrated) and ``label``: REFER inside the validation-chosen referral band, else
NORMAL or PNEUMONIA at the validation-chosen threshold.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumo.core.inference import MODEL_ARTIFACT, Classifier


class PneumoniaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config
        self.classifier = Classifier.load(
            Path(context.artifacts[MODEL_ARTIFACT]),
            device=config["inference_device"],
            expected_sha256=config["weights_sha256"],
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
            return pd.DataFrame({"probability": pd.Series(dtype=float), "label": []})
        pixels = np.stack([self._pixels(i, item) for i, item in enumerate(model_input["image"])])
        decisions = [
            self.classifier.decide(float(p)) for p in self.classifier.probabilities(pixels)
        ]
        return pd.DataFrame(decisions, columns=["probability", "label"])


mlflow.models.set_model(PneumoniaModel())

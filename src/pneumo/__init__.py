"""pneumo: experiment-tracked chest X-ray pneumonia classifiers."""

__version__ = "0.1.0"

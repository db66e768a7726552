"""Where runs and models go: MLflow tracking and registry, serving, DVC experiments, plots.

Built on :mod:`pneumo.core` and the shared base modules; no stage is imported from here.
"""

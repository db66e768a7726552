"""The machine-learning core: models, losses, metrics, images, the cache, inference, Grad-CAM.

Pure of the MLOps tools: nothing here imports MLflow or DVC, or a module of
:mod:`pneumo.mlops` or :mod:`pneumo.stages` (tests/test_architecture.py checks it), so a
model folder runs with this package, the shared base modules and torch alone.
"""

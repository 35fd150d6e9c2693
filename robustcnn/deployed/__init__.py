"""Deployed models as untrusted input: format detection, safe loading, ONNX -> torch, the model card.

The audit *job* (``robustcnn audit``: battery, checks, verdict, MLflow) is :mod:`robustcnn.jobs.audit`,
and :func:`robustcnn.audit` is its Python API; this package only turns a file or an MLflow model into
a checked :class:`~robustcnn.models.Classifier` (named ``deployed`` so that ``robustcnn.audit`` stays
the function).
"""

"""``robustcnn audit``: load a deployed model safely, attack it with the full battery, give a verdict."""

from robustcnn.audit.run import run_audit

__all__ = ["run_audit"]

"""The only code that talks to MLflow: the store, run records, dedupe/resume, sync, the UI server."""

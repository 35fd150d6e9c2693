"""Hydra multiruns: the callback that opens the parent run before any job, the summary, the launchers."""

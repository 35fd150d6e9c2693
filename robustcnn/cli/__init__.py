"""The ``robustcnn`` command (:func:`main`) and its subcommands."""

from robustcnn.cli.command import main

__all__ = ["main"]

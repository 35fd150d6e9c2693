"""`python -m robustcnn.cli`: the same as the ``robustcnn`` command.

It calls the imported :func:`robustcnn.cli.command` (not code in a ``__main__`` copy), so a sweep's task
function lives in an importable module that parallel workers can load.
"""

from robustcnn.cli.command import main

main()

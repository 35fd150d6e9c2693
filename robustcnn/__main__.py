"""`python -m robustcnn` is the same as the `robustcnn` command."""

from robustcnn.cli import main

main()

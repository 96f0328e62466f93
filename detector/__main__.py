"""`python -m detector` runs the command line."""

from detector.cli import main

main()

"""``python -m dicompipe ...`` runs the command-line interface (same as ``dicompipe ...``)."""
import sys

from dicompipe.cli import main

sys.exit(main())

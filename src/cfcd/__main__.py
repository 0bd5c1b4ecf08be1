"""``python -m cfcd`` (also what ``torchrun -m cfcd`` runs)."""
import sys

from cfcd.cli import main

sys.exit(main())

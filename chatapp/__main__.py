"""`python -m chatapp ...`: the command line (see chatapp.cli)."""
import sys

from chatapp.cli import main

if __name__ == "__main__":
    sys.exit(main())

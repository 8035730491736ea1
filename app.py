"""`python app.py` serves the chat: the same as `python -m chatapp serve` (it takes the same options)."""
import sys

from chatapp.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

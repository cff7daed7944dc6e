"""One-line errors for bad input. A module of its own, so that the idea layer (jfmini.jacobi through
engine.py) can refuse bad arguments without importing the hardened file handling."""


class UserError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""

"""tutorgate: a reverse proxy that enforces the Double Reduction session rules."""

__version__ = "0.1.0"

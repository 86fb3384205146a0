"""dalle: DALL·E (Ramesh et al., 2021) from the command line."""

__version__ = "0.1.0"

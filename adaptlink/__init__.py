"""AdaptLink: one LLaVA model across several heterogeneous devices.

Importing this package is cheap (no torch); the heavy modules import torch themselves.
"""

__version__ = "0.1.0"

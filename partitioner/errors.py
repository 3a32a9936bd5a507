"""User-facing errors of every layer (the CLI prints them on one line, exit code 2).

Each message names the file (or input) and the field at fault, with the numbers. They live
in the bottom layer so that every layer above can raise them without importing upward.
"""

from __future__ import annotations


class AdaptLinkError(Exception):
    """Bad input from the user: the message names the file/input and the field at fault."""


class ModelSourceError(AdaptLinkError):
    """A model source (preset name or checkpoint directory) that cannot be used."""


class ClusterSpecError(AdaptLinkError):
    """A cluster.json that is not valid: `cluster.json: devices[2].memory_bytes: ...`."""


class PlanError(AdaptLinkError):
    """A plan.json that is not valid, or planning options that do not fit together."""


class InfeasiblePlanError(PlanError):
    """No placement fits: says by how many bytes and on which devices."""

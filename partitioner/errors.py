"""The partitioner's user-facing errors (the CLI prints them on one line, exit code 2).

Each message names the file (or input) and the field at fault, with the numbers.
"""

from __future__ import annotations

from adaptlink.errors import AdaptLinkError


class ClusterSpecError(AdaptLinkError):
    """A cluster.json that is not valid: `cluster.json: devices[2].memory_bytes: ...`."""


class PlanError(AdaptLinkError):
    """A plan.json that is not valid, or planning options that do not fit together."""


class InfeasiblePlanError(PlanError):
    """No placement fits: says by how many bytes and on which devices."""

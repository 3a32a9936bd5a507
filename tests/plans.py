"""Hand-made plans for runtime tests (the package's own helpers, re-exported)."""

from adaptlink.plans import all_blocks, chain_shares, manual_plan, write_plan  # noqa: F401

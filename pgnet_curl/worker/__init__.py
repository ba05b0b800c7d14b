"""The worker process, in stages: see loop.py for how a request passes through them."""

from .context import lease_owner
from .loop import Worker

__all__ = ["Worker", "lease_owner"]

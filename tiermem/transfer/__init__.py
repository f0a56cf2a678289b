"""HOW bytes move: frozen plans (``plan``) and the asynchronous engine (``engine``)."""

from tiermem.transfer.engine import TransferConfig, TransferEngine, TransferHandle
from tiermem.transfer.plan import Copy, Direction, Endpoint, TransferPlan, endpoint, make_plan

__all__ = ["Copy", "Direction", "Endpoint", "TransferConfig", "TransferEngine", "TransferHandle", "TransferPlan",
           "endpoint", "make_plan"]

"""HOW bytes move: frozen plans (``plan``) and the asynchronous engine (``engine``)."""

from tiermem.transfer.engine import TransferConfig, TransferEngine, TransferHandle
from tiermem.transfer.plan import Copy, Direction, TransferPlan, make_plan

__all__ = ["Copy", "Direction", "TransferConfig", "TransferEngine", "TransferHandle", "TransferPlan", "make_plan"]

"""The one error hierarchy of tiermem.

Every error a user can trigger is a ``TierMemError``. Messages name the subsystem, the cause, the
numbers involved and the fix, so that a user never has to read a traceback from deep inside.
``assert`` is reserved for internal invariants.
"""

from __future__ import annotations


class TierMemError(Exception):
    """Base of every error tiermem raises on purpose."""


class ConfigError(TierMemError, ValueError):
    """A configuration value or key is invalid (unknown key, wrong type, out of range)."""


class RegistryError(TierMemError, KeyError):
    """A name was looked up in (or registered twice into) a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class TopologyError(TierMemError):
    """The host lacks something a tier asked for (a NUMA node, a GPU, a dax device)."""


class CapacityError(TierMemError, MemoryError):
    """A tier cannot hold what was asked of it."""


class OwnershipError(TierMemError, ValueError):
    """A tensor or block is not owned by tiermem, or was already freed."""


class TransferError(TierMemError):
    """A transfer was refused (e.g. pageable source) or failed while moving bytes."""


class InjectedFault(TransferError):
    """An I/O failure injected on purpose by the ``faulty`` tier."""


class TraceError(TierMemError, ValueError):
    """A routing trace, an importer's input or a predictor's input is malformed or inconsistent."""


class RepairError(TierMemError):
    """EP coverage repair: an invalid membership transition, a placement that does not fit, or no source left."""

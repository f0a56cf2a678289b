"""tiermem: tiered-memory offloading for LLM inference (placeholder, filled in by the foundation)."""

"""Tests of tiermem.experts, the prefetcher and tiermem bench moe."""

"""Tests of tiermem.rdma (transports, pool server and client, fallback), the rdma tier and `tiermem pool`."""

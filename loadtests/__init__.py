"""Locust load tests of a running Arbitrage Serve (a black box: only arbitrage_common.client
and the synthetic task's problem generator are imported, never ``services``)."""

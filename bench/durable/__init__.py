"""Durable-delivery benchmarks (bench/durable.py, bench/idle_ws.py): server, setup, clients."""

"""Fan-out load generator: raw asyncio Protocol clients on uvloop (see bench/README.md)."""

"""Broker: cross-worker / cross-node fan-out. ``MemoryBroker`` (one process) and ``RedisBroker``."""

from shared.broker.base import Broker, MessageHandler

__all__ = ["Broker", "MessageHandler"]

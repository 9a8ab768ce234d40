"""Rampart node service: the engine that runs on every node."""

__version__ = "0.1.0"

"""checkers area of the node service."""

"""api area of the node service."""

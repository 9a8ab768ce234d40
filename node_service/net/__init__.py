"""net area of the node service."""

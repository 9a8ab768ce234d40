"""lab area of the node service."""

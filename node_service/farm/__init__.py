"""farm area of the node service."""

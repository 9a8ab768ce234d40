"""replication area of the node service."""

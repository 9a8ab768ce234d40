"""mirror area of the node service."""

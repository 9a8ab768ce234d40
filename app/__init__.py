"""Console logic without widgets: site model, SSH sessions, deploy pipeline, live feeds."""

"""checkers area: pure verdicts (decide), checks (probes, process) and their runner."""

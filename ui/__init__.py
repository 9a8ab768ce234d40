"""Console views (PySide6). Each view takes its model from `app`."""

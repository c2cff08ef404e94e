"""Storage: where a node keeps its documents, journal and session cursors."""

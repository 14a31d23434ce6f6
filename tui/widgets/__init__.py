"""Self-contained Textual widgets for the zaiproxy terminal UI."""

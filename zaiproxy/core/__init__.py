"""The floor every wing stands on: errors, configuration, logs, the seam types."""

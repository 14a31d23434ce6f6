"""Tests for the Textual terminal UI (tui/)."""

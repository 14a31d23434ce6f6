"""The Textual terminal UI of zaiproxy (``zaiproxy tui``); talks only to the admin API."""

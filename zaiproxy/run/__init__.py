"""Processes: the supervisor, the workers, their sockets."""

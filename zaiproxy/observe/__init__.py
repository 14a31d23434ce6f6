"""What operators read: metrics, snapshots, the history recorder."""

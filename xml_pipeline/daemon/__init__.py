"""The long-running service around the pump: HTTP ingress, signals, systemd, reload."""

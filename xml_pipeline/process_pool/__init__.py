"""Running cpu_bound handlers in worker processes."""

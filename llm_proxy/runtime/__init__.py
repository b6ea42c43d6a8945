"""The runtime: CLI, settings, assembly of the server, and its processes."""

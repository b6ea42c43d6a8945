"""The control plane: the management API, its operations, and the manage CLI client."""

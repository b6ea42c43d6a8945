"""The HTTP machinery: the front-door server, its request policy, the upstream client."""

"""The proxy path: admission of withering tokens, the handler, what it records."""

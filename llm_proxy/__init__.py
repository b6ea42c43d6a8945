"""llm-proxy: an OpenAI gateway issuing withering tokens."""

__version__ = "0.1.0"

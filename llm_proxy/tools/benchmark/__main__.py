"""``python -m llm_proxy.tools.benchmark``, the same command as ``llm-proxy benchmark``."""

from llm_proxy.tools.benchmark.command import benchmark_command

if __name__ == "__main__":
    benchmark_command()

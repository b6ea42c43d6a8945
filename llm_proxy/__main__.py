"""``python -m llm_proxy``: the same commands as the ``llm-proxy`` console script."""

from llm_proxy.runtime.cli import main

if __name__ == "__main__":
    main(prog_name="llm-proxy")

"""``python -m dispatcher``: the same command as ``llm-proxy dispatcher``."""

from dispatcher.cli import dispatcher_command

dispatcher_command(prog_name="llm-proxy dispatcher")

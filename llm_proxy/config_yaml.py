"""YAML as the configuration files (``api_providers.yaml``, ``prices.yaml``) are read: safely
(no arbitrary objects), and with a key given twice in one mapping refused. PyYAML keeps the last
of two equal keys and drops the first without a word, which in a configuration file hides a
mistake (a second ``allowed_endpoints:`` line that replaces the first)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ValueError):
    """A mapping holds a key twice; the message names it and the line of the second one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            # A merge (``<<: *defaults``) brings keys the mapping may override: no duplicate.
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise DuplicateKeyError(
                        f"{key}: listed twice (line {key_node.start_mark.line + 1})"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(text: str | bytes) -> Any:
    """The document ``text`` holds; raises :class:`DuplicateKeyError` or ``yaml.YAMLError``.
    A file's bytes are decoded as YAML says (UTF-8, or UTF-16 after its byte-order mark): what
    does not decode is a ``yaml.YAMLError`` too."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects

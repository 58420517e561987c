"""The one YAML reader of the product: safe types only, duplicate keys refused, size bounded.

PyYAML's `safe_load` keeps the last of two equal keys in a mapping without a word, so a config
that says `rounds: 40` on line 3 and `rounds: 4` on line 30 trains 4 rounds and nobody sees why.
`UniqueKeyLoader` is PyYAML's `SafeLoader` (no Python objects are ever built) whose mappings check
their keys before they are constructed; merge keys (`<<: *base`) keep their meaning (an explicit
key overrides a merged one). Every YAML file and `--set` value the product reads goes through
`load_yaml` (configs, inventories, deployments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode

from .errors import ConfigError

MAX_BYTES = 1 << 20  # a config, an inventory or a deployments file is a few KiB
MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice."""

    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {second})")
        self.key = key
        self.first = first
        self.second = second


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` refusing a mapping that repeats a key."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML `text` read from `source` (a path or a description, for messages).

    Raises:
        ConfigError: the text is too large, not YAML, or repeats a key in a mapping (the key and
            both lines named).
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters, more than the {MAX_BYTES} accepted")
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise ConfigError(
            f"{source}: key {exc.key!r} is given twice in the same mapping (line {exc.first} and "
            f"line {exc.second}); keep one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


def load_yaml_file(path: Path) -> Any:
    """`load_yaml` of a file's text (its size checked before reading).

    Raises:
        ConfigError: unreadable, too large, not YAML, or a repeated key.
    """
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes, more than the {MAX_BYTES} accepted")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return load_yaml(text, str(path))

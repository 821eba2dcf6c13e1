"""Reading a run config: YAML files (yaml.safe_load through a loader that refuses duplicate keys)
and `--set section.key=value` items, with errors of one line that name the file and line, or the
item, a value came from. The schema itself is config.py; this module only reads and writes it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .schema import Config, ConfigError, from_dict, to_dict, with_overrides  # noqa: F401 (re-exported)

# ---- reading YAML --------------------------------------------------------------------------

class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, first_mark, mark):
        super().__init__(None, None, f"duplicate key {key!r}", mark)
        self.first_mark = first_mark


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, nothing that constructs objects) that refuses a key
    written twice in one mapping, at any depth: plain safe_load keeps the last one silently, so
    a section written twice would lose the first one's fields without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it below, with its line
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError, text: str, *, lines: bool = True) -> tuple[str, str]:
    """(where, what) of a YAML error, each on one line (PyYAML's own str is several lines with a
    source excerpt). `lines=False` for a one-line --set value: its column is enough."""
    def at(line: int, col: int) -> str:
        return f"line {line + 1}, column {col + 1}" if lines else f"column {col + 1}"

    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (a NUL byte, ...)
        line = text.count("\n", 0, e.position)
        col = e.position - (text.rfind("\n", 0, e.position) + 1)
        return at(line, col), f"unacceptable character {chr(e.character)!r}: {e.reason}"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(e.problem or e.context or "not valid YAML").split())
        if isinstance(e, DuplicateKeyError):
            problem += f" (first at {at(e.first_mark.line, e.first_mark.column).split(', ')[0 if lines else -1]})"
        elif e.context and e.problem:
            context = " ".join(e.context.split())
            if e.context_mark is not None and lines and e.context_mark.line != getattr(mark, "line", None):
                context += f" started at line {e.context_mark.line + 1}"
            problem += f" ({context})"
        return (at(mark.line, mark.column) if mark is not None else ""), problem
    return "", " ".join(str(e).split())


def _key_lines(node, prefix: str = "", out: dict[str, int] | None = None, depth: int = 0) -> dict[str, int]:
    """Dotted key (and models[1]-style item) -> the line it is on, from the composed YAML tree."""
    out = {} if out is None else out
    if depth > 3:  # a config is section.field[i] deep; aliases may even make the tree a cycle
        return out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                dotted = f"{prefix}{key_node.value}"
                out[dotted] = key_node.start_mark.line + 1  # merged keys (`<<`) come first: the own one wins
                _key_lines(value_node, dotted + ".", out, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(f"{prefix.rstrip('.')}[{i}]", item.start_mark.line + 1)
            _key_lines(item, f"{prefix.rstrip('.')}[{i}].", out, depth + 1)
    return out


def _load_text(text: str) -> tuple[Any, Any]:
    """yaml.safe_load with UniqueKeyLoader; also returns the composed node (for line numbers)."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def read_yaml_lines(path: str, what: str) -> tuple[dict, dict[str, int]]:
    """Read a YAML file that must hold a mapping; also returns the line of every dotted key.
    Every way it can fail (missing, unreadable, not UTF-8, not YAML, a duplicate key, not a
    mapping) is a ConfigError of one line naming the file and, where known, the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {path!r} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM some editors write is fine
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{what} {path!r}, line {line}, column {col}: not UTF-8 text "
                          f"(byte 0x{data[e.start]:02x}); save it as UTF-8") from None
    try:
        raw, node = _load_text(text)
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e, text)
        raise ConfigError(f"{what} {path!r}{', ' + where if where else ''}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path!r}: nested too deeply to be a config") from None
    if raw is None:  # an empty file (or only comments): all defaults
        return {}, {}
    if not isinstance(raw, Mapping):
        kind = {list: "a list", str: "a string", bool: "true/false"}.get(type(raw), "a number")
        raise ConfigError(f"{what} {path!r}, line {node.start_mark.line + 1}: the top level must be a "
                          f"mapping (key: value lines), got {kind}")
    return raw, _key_lines(node)


def read_yaml(path: str, what: str) -> dict:
    """yaml.safe_load a file (never anything that executes), refusing a missing or broken one,
    a duplicate key, or a top level that is not a mapping, with one line naming the file."""
    return read_yaml_lines(path, what)[0]


def parse_value(text: str) -> Any:
    """A --set value is read as YAML, so 4.0, true, null and [a, b] mean what they look like."""
    return _load_text(text)[0] if text != "" else ""


def parse_set(item: str) -> tuple[str, Any]:
    """One `--set section.key=value` item; a refusal names the item."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. loss.temperature=4")
    key, _, text = item.partition("=")
    try:
        return key.strip(), parse_value(text)
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e, text, lines="\n" in text.strip())  # one line: the column is enough
        where = f" at {where} of the value" if where else ""
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"--set {item!r}: the value is nested too deeply") from None


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    return dict(parse_set(item) for item in items or [])


def load(path: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML run config (yaml.safe_load only) and apply dotted overrides."""
    raw = read_yaml(path, "config file")
    cfg = from_dict(raw)
    return with_overrides(cfg, overrides) if overrides else cfg


@dataclass(frozen=True)
class Source:
    """Where the values of a config came from: a file's lines and --set items. An error about a
    field is told with its source in front, so the user knows which line or item to change."""

    path: str
    lines: Mapping[str, int] = field(default_factory=dict)
    """Dotted field (or models[i]) -> its line in the file."""
    sets: Mapping[str, str] = field(default_factory=dict)
    """Dotted field -> the --set item that set it (these win over the file)."""

    def where(self, field_name: str | None) -> str:
        """The --set item, else the file line, of a field, or of the nearest enclosing one
        (models[1] -> models, loss.temperature -> loss)."""
        candidates = []
        name = field_name or ""
        while name:
            candidates.append(name)
            name = name[:name.rindex("[")] if name.endswith("]") else name.rpartition(".")[0]
        for c in candidates:
            if c in self.sets:
                return f"--set {self.sets[c]!r}"
        for c in candidates:
            if c in self.lines:
                return f"config file {self.path!r}, line {self.lines[c]}"
        return f"config file {self.path!r}"

    def locate(self, e: ConfigError) -> ConfigError:
        return ConfigError(f"{self.where(e.field)}: {e}", e.field)


def load_checked(path: str, sets: list[str] | None = None) -> tuple[Config, Source]:
    """What the CLI runs before anything heavy: read the file, apply the --set items and make
    every check that needs no registry (Config.check_fields). Imports nothing beyond PyYAML, so a
    refusal costs the interpreter's start-up only. Every ConfigError names the file and line, or
    the --set item, where the value came from; the registry checks (online_distill.run.checks) come
    later, and `Source.locate` tells their errors the same way."""
    raw, lines = read_yaml_lines(path, "config file")
    items: dict[str, tuple[Any, str]] = {}  # key -> (value, the item); of one key given twice, the last wins
    for item in sets or []:
        key, value = parse_set(item)
        items[key] = (value, item)
    source = Source(path, lines, {key: item for key, (_, item) in items.items()})
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        raise Source(path, lines).locate(e) from None
    for key, (value, item) in items.items():
        try:
            cfg = with_overrides(cfg, {key: value})
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {e}", e.field) from None
    try:
        return cfg.check_fields(), source
    except ConfigError as e:
        raise source.locate(e) from None


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

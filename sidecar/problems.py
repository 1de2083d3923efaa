"""The one problem collector of the settings front-ends (pure): the config file, policy files and the pod
annotations each collect every problem with its location, then raise them together as one ConfigError
(DESIGN.md "every problem listed with its location").

A location is `<source>[:<line>][: <field path>]`:

* a YAML document (config file, policy file, a YAML policy annotation): `Problems(source, lines)`, where
  `lines` maps field paths (`inbound.policy.rules[2].callers[0]`, the root is "") to 1-based lines
  (`config.parse_yaml`). A field that is not there (a required key) is placed on the line of its nearest
  present ancestor: `inbound.policy.rules[2]` for a missing `inbound.policy.rules[2].callers`.
* a fragment compiled inside a larger document (the inline policy of a config file):
  `Problems(source, lines, prefix="inbound.policy")` puts the prefix before every field path.
* inputs that are each their own source (pod annotations): `Problems.per_key("annotation spiffe-sidecar.io/")`
  names the key after the stem, and the line inside a multi-line value when given:
  `annotation spiffe-sidecar.io/outbound:3`.
* an environment variable, from either kind: `env NAME`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from .errors import ConfigError, Problem

__all__ = ["Problems"]


class Problems:
    """Collects the problems of one input in the order found (`items`)."""

    def __init__(self, source: str, lines: Mapping[str, int] | None = None, *, prefix: str = "") -> None:
        self.source = source
        self.lines: Mapping[str, int] = lines or {}
        self.prefix = prefix
        self.items: list[Problem] = []
        self._per_key = False

    @classmethod
    def per_key(cls, stem: str) -> Problems:
        """A collector whose `add(key, ...)` locates at `<stem><key>[:<line>]`, with no field path."""
        problems = cls(stem)
        problems._per_key = True
        return problems

    def where(self, path: str, *, line: int | None = None) -> str:
        """The location of `path` (a field path, or the key in per-key mode); `line` overrides the lookup."""
        if self._per_key:
            return f"{self.source}{path}" + (f":{line}" if line is not None else "")
        path = self._field(path)
        if line is None:
            line = self._line(path)
        loc = f"{self.source}:{line}" if line is not None else self.source
        return f"{loc}: {path}" if path else loc

    def add(self, path: str, message: str, *, line: int | None = None) -> None:
        self.items.append(Problem(self.where(path, line=line), message))

    def env(self, name: str, message: str) -> None:
        """A problem with the environment variable `name` (no file, no line)."""
        self.items.append(Problem(f"env {name}", message))

    def extend(self, problems: Iterable[Problem]) -> None:
        """Problems located elsewhere (another file, a nested compile), kept as they are."""
        self.items.extend(problems)

    def error(self) -> ConfigError:
        return ConfigError(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.items)

    def _field(self, sub: str) -> str:
        if not self.prefix:
            return sub
        if not sub or sub.startswith("["):
            return self.prefix + sub
        return f"{self.prefix}.{sub}"

    def _line(self, path: str) -> int | None:
        # The nearest present ancestor: drop a trailing `.key` or `[n]` until a recorded path is found.
        while path and path not in self.lines:
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get(path)

"""Pruning specs: the ``METHOD:ARGS[OPTIONS]`` strings users write.

Grammar::

    spec    := method (":" arg)* ("[" option ("," option)* "]")?
    option  := key "=" value

Examples: ``dense``, ``magnitude:0.9``, ``magnitude-layer:0.5``, ``nm:2:4``,
``magnitude:0.8[prune_first=true]``. A list of specs is comma-separated; commas inside
``[...]`` belong to the options (``split_specs``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from benchlib.errors import ConfigError

_SPEC = re.compile(r"^(?P<body>[^\[\]]+?)(?:\[(?P<options>[^\[\]]*)\])?$")


@dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """A parsed pruning spec; ``str(spec)`` gives back the canonical text."""

    method: str
    args: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = ":".join((self.method, *self.args))
        if self.options:
            text += "[" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())) + "]"
        return text

    def __hash__(self) -> int:
        return hash(str(self))

    def amount(self, position: int = 0) -> float:
        """The argument at ``position`` as a pruning amount in the open interval (0, 1)."""
        if position >= len(self.args):
            raise ConfigError(f"spec {str(self)!r} needs an amount, e.g. '{self.method}:0.5'")
        text = self.args[position]
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"amount {text!r} in spec {str(self)!r} is not a number in (0, 1)"
            ) from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"amount {text} in spec {str(self)!r} is outside (0, 1)")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean option (true/false, yes/no, 1/0)."""
        text = self.options.get(key)
        if text is None:
            return default
        lowered = text.lower()
        if lowered in {"true", "yes", "1"}:
            return True
        if lowered in {"false", "no", "0"}:
            return False
        raise ConfigError(f"option {key}={text!r} in spec {str(self)!r}: use true or false")


def parse_spec(text: str) -> PruneSpec:
    """Parse one spec. Raises ConfigError on malformed text (not on unknown methods)."""
    match = _SPEC.match(text.strip())
    if match is None or not match["body"].strip():
        raise ConfigError(f"malformed pruning spec {text!r}; expected METHOD:AMOUNT, e.g. l1:0.5")
    method, *args = (part.strip() for part in match["body"].split(":"))
    options: dict[str, str] = {}
    for item in filter(None, (o.strip() for o in (match["options"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed option {item!r} in spec {text!r}; expected KEY=VALUE")
        options[key.strip()] = value.strip()
    if not method or any(not a for a in args):
        raise ConfigError(f"malformed pruning spec {text!r}; empty method or argument")
    return PruneSpec(method=method.lower(), args=tuple(args), options=options)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping commas inside ``[...]``."""
    parts: list[str] = []
    depth, current = 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]

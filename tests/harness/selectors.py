"""Label and field selectors, as the Kubernetes API server applies them (kmock ignores them)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict[str, str]], bool]:
    if not selector:
        return lambda _labels: True
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in _split(selector):
        set_match = _SET.match(part)
        if set_match:
            key, op, values = set_match[1], set_match[2], {v.strip() for v in set_match[3].split(",")}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in part:
            key, value = (s.strip() for s in part.replace("==", "=").split("=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif part.startswith("!"):
            tests.append(lambda labels, k=part[1:].strip(): k not in labels)
        else:
            tests.append(lambda labels, k=part: k in labels)
    return lambda labels: all(test(labels) for test in tests)


def field_matcher(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    if not selector:
        return lambda _obj: True
    tests = []
    for part in _split(selector):
        negate = "!=" in part
        path, value = (s.strip() for s in part.replace("==", "=").replace("!=", "=").split("=", 1))

        def get(obj: dict[str, Any], path: str = path) -> Any:
            current: Any = obj
            for key in path.split("."):
                current = current.get(key) if isinstance(current, dict) else None
            return current

        tests.append(lambda obj, g=get, v=value, n=negate: (str(g(obj)) == v) != n)
    return lambda obj: all(test(obj) for test in tests)

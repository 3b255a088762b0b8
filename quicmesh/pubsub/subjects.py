"""Subjects with NATS syntax, and the trie that matches a subject against thousands of patterns. Pure.

A subject is dot-separated tokens (``orders.eu.created``). A pattern may also use the wildcards ``*``
(exactly one token) and ``>`` (one or more tokens; last token only). A token is never empty and holds
no whitespace or control character; a wildcard character inside a longer token (``ord*``) is a plain
character for NATS and refused here, since it is almost always a mistake. At most MAX_SUBJECT_BYTES
bytes of UTF-8. Queue group names: 1..MAX_QUEUE_GROUP_BYTES bytes, no whitespace, control characters,
dots or wildcards.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from quicmesh.errors import InvalidSubjectError
from quicmesh.protocol.wire.common import MAX_QUEUE_GROUP_BYTES, MAX_SUBJECT_BYTES

V = TypeVar("V", bound=Hashable)

_WILDCARDS = ("*", ">")


def _bad_character(text: str) -> str | None:
    for char in text:
        if char.isspace() or not char.isprintable():
            return "whitespace" if char.isspace() else f"control character {char!r}"
    return None


def _check(text: object, what: str, *, wildcards: bool) -> str:
    if not isinstance(text, str):
        raise InvalidSubjectError(f"{what} must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidSubjectError(f"{what} is empty")
    _check_size(text, what, MAX_SUBJECT_BYTES)
    bad = _bad_character(text)
    if bad is not None:
        raise InvalidSubjectError(f"{what} {text!r} contains {bad}")
    tokens = text.split(".")
    for index, token in enumerate(tokens):
        if not token:
            raise InvalidSubjectError(f"{what} {text!r} has an empty token")
        if token in _WILDCARDS:
            if not wildcards:
                raise InvalidSubjectError(f"{what} {text!r} has a wildcard: publish to a concrete subject")
            if token == ">" and index != len(tokens) - 1:
                raise InvalidSubjectError(f"{what} {text!r}: '>' may only be the last token")
        elif "*" in token or ">" in token:
            raise InvalidSubjectError(f"{what} {text!r}: a wildcard must be a whole token, not part of {token!r}")
    return text


def _check_size(text: str, what: str, limit: int) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidSubjectError(f"{what} {text!r} is not valid Unicode text") from None
    if size > limit:
        raise InvalidSubjectError(f"{what} of {size} bytes is longer than {limit}")


def validate_subject(subject: object) -> str:
    """``subject`` if it is a valid concrete subject (what is published), else InvalidSubjectError."""
    return _check(subject, "subject", wildcards=False)


def validate_pattern(pattern: object) -> str:
    """``pattern`` if it is a valid subject pattern (what is subscribed to), else InvalidSubjectError."""
    return _check(pattern, "subject pattern", wildcards=True)


def validate_group(group: object) -> str:
    """``group`` if it is a valid queue group name, else InvalidSubjectError."""
    if not isinstance(group, str) or not group:
        raise InvalidSubjectError(f"queue group must be a non-empty string, got {group!r}")
    _check_size(group, "queue group", MAX_QUEUE_GROUP_BYTES)
    bad = _bad_character(group)
    if bad is None and any(char in group for char in ".*>"):
        bad = "'.', '*' or '>'"
    if bad is not None:
        raise InvalidSubjectError(f"queue group {group!r} contains {bad}")
    return group


def covers(allowed: str, pattern: str) -> bool:
    """Whether every subject ``pattern`` matches is also matched by ``allowed`` (both valid patterns):
    how a permission decides whether a peer may subscribe to a pattern."""
    wanted, granted = pattern.split("."), allowed.split(".")
    for index, token in enumerate(granted):
        if token == ">":
            return len(wanted) > index
        if index >= len(wanted):
            return False
        if token == "*":
            if wanted[index] == ">":
                return False
        elif token != wanted[index]:
            return False
    return len(wanted) == len(granted)


def matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches ``pattern`` (one pair; the trie does many at once)."""
    return covers(pattern, subject)


class _Node(Generic[V]):
    __slots__ = ("children", "star", "values", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.star: _Node[V] | None = None  # the '*' child
        self.values: set[V] = set()  # patterns ending here
        self.rest: set[V] = set()  # patterns ending here with '>'

    def empty(self) -> bool:
        return not (self.children or self.star or self.values or self.rest)


class SubjectTrie(Generic[V]):
    """Values filed under subject patterns; :meth:`match` finds every value whose pattern matches a subject,
    in time that depends on the subject's length and the wildcards on its path, not on how many patterns
    there are. Patterns must be valid (validate_pattern); a value may sit under several patterns."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: V) -> bool:
        """File ``value`` under ``pattern``; False if it was already there."""
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = self._child(node, token)
        last = tokens[-1]
        if last == ">":
            bucket = node.rest
        else:
            bucket = self._child(node, last).values
        if value in bucket:
            return False
        bucket.add(value)
        self._count += 1
        return True

    @staticmethod
    def _child(node: _Node[V], token: str) -> _Node[V]:
        if token == "*":
            if node.star is None:
                node.star = _Node()
            return node.star
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node()
        return child

    def remove(self, pattern: str, value: V) -> bool:
        """Take ``value`` from under ``pattern``; False if it was not there. Empty branches are pruned."""
        path: list[tuple[_Node[V], str]] = []
        node: _Node[V] | None = self._root
        tokens = pattern.split(".")
        walk = tokens[:-1] if tokens[-1] == ">" else tokens
        for token in walk:
            assert node is not None
            path.append((node, token))
            node = node.star if token == "*" else node.children.get(token)
            if node is None:
                return False
        bucket = node.rest if tokens[-1] == ">" else node.values
        if value not in bucket:
            return False
        bucket.discard(value)
        self._count -= 1
        for parent, token in reversed(path):
            child = parent.star if token == "*" else parent.children[token]
            if child is None or not child.empty():
                break
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]
        return True

    def match(self, subject: str) -> set[V]:
        """Every value whose pattern matches ``subject`` (a valid concrete subject)."""
        found: set[V] = set()
        tokens = subject.split(".")
        last = len(tokens)
        level = [self._root]
        for index, token in enumerate(tokens):
            following: list[_Node[V]] = []
            for node in level:
                if node.rest:
                    found |= node.rest  # '>' takes this token and the rest
                child = node.children.get(token)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            if not following:
                return found
            level = following
            if index == last - 1:
                for node in level:
                    found |= node.values
        return found

    def patterns(self) -> Iterable[tuple[str, V]]:
        """Every ``(pattern, value)`` filed, depth first (for status and resyncs)."""
        stack: list[tuple[_Node[V], list[str]]] = [(self._root, [])]
        while stack:
            node, prefix = stack.pop()
            for value in node.values:
                yield ".".join(prefix), value
            for value in node.rest:
                yield ".".join([*prefix, ">"]), value
            if node.star is not None:
                stack.append((node.star, [*prefix, "*"]))
            for token, child in node.children.items():
                stack.append((child, [*prefix, token]))

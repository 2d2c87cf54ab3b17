"""Parsing documents that come from outside the agent, in one place: every way a document can
be malformed becomes a `ValueError`, which each adapter translates to its typed error
(`InvalidCniEventError`, `CniConfigError`, `KubeApiError`, `SelectorError`).

The standard parsers recurse: a document nested deeper than the interpreter's recursion limit
(20,000 `[` fit in 40 KB, under any size limit we set) raises `RecursionError`, which is not a
`ValueError` and would otherwise escape as an internal error.
"""

from __future__ import annotations

import json
from typing import Any, Final

import yaml


class MalformedDocumentError(ValueError):
    """The text is not a well-formed document; the message says why."""


TOO_DEEP: Final = "nested too deeply"


def load_json(data: str | bytes) -> Any:
    """`json.loads` for untrusted input: whatever is wrong raises `MalformedDocumentError`."""
    try:
        return json.loads(data)
    except RecursionError:
        raise MalformedDocumentError(TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MalformedDocumentError(str(exc)) from None


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` for untrusted input: a document too deep raises
    `MalformedDocumentError`; YAML's own errors (`yaml.YAMLError`, with their marks) pass
    unchanged."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise MalformedDocumentError(TOO_DEEP) from None

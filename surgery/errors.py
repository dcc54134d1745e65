"""The two ways a run can fail, and what the CLI makes of them.

`SurgeryError` is bad input (exit 2): a recipe, a source or an output the user must fix.
It carries a `loc` (path into the recipe) so the loader can point at file:line:column.
`VerificationFailed` means the surgery ran but broke its promise (exit 1).
"""
from __future__ import annotations


class SurgeryError(Exception):
    exit_code = 2

    def __init__(self, message: str, loc: tuple | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc = tuple(loc) if loc else None
        self.where = where

    def located(self, where: str) -> "SurgeryError":
        if self.where is None:
            self.where = where
        return self

    def __str__(self) -> str:
        field = ".".join(str(p) for p in self.loc) if self.loc else None
        parts = [p for p in (self.where, field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class VerificationFailed(Exception):
    exit_code = 1

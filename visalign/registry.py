"""One registry per extension axis (encoders, LLMs, projectors, objectives): a plain dict name -> factory.

The only thing it adds to ``dict`` is the error: an unknown name says which registry and lists the valid
names, so a typo on the command line is fixed in one look.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visalign.errors import VisalignError


class UnknownNameError(VisalignError, KeyError):
    """An unknown registry name (a user error; also a KeyError, as for any mapping lookup); ``str()`` is the
    plain message (KeyError would repr-quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: ``@ENCODERS.register("tiny-clip")``."""

        def deco(factory):
            if name in self:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self[name] = factory
            return factory

        return deco

    def __missing__(self, name):
        valid = ", ".join(sorted(self)) or "(none registered)"
        raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}")

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {sorted(self)})"

"""Read-only containers for the free-form mappings of a run spec (model configs, DeepSpeed overrides):
once a spec is validated nothing in it can change, so its hash cannot drift."""

from __future__ import annotations

from typing import Any


class FrozenDict(dict):
    """A read-only dict: the free-form mappings of a spec. Nested mappings are `FrozenDict`s and
    nested lists `FrozenList`s. `copy.deepcopy` returns plain, mutable dicts and lists (a copy to edit);
    `copy.copy` returns the object itself."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("spec mappings are read-only; copy.deepcopy() one to get an editable dict")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> dict:
        return thaw(self)

    def __reduce__(self) -> tuple:
        return FrozenDict, (dict(self),)


class FrozenList(tuple):
    """A read-only list inside a spec's free-form mapping; `copy.deepcopy` returns a plain list."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> list:
        return thaw(self)


def freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return FrozenList(freeze(item) for item in value)
    if isinstance(value, set):
        return frozenset(value)
    return value


def thaw(value: Any) -> Any:
    """A plain (mutable) copy of frozen containers: dicts and lists all the way down."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    if isinstance(value, frozenset):
        return set(value)
    return value

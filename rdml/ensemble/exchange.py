"""The exchange between members: publish my record, get the others'. The one protocol every backend moves.

Every ensemble step ``s``:

1. every member publishes the record its self-transfer strategy gives (:meth:`Member.publish`; ``None``
   when the mode shares nothing);
2. every member takes step ``s`` with the records of *all other* members, in member order
   (:meth:`Member.step`, :func:`others`).

That is an all-gather at each step boundary, and nothing else: no member waits for another inside a
step, so members run fully in parallel between two exchanges and a lost member can never leave
another one blocked. A backend only moves records. The in-process backend
(:class:`rdml.ensemble.local.LocalEnsemble`) passes the objects; the Ray backend
(:mod:`rdml.distributed.eat`) returns each record's ObjectRef from the step that produced it and hands
the references (never the records) to the next step, so records go through the object store and the
driver never holds one. Neither backend looks inside a record or knows the mode; what a record holds
and what a member does with the others' is the strategy's business (:mod:`rdml.ensemble.transfer`).

A record is a typed, versioned object (:class:`Record`): a :class:`rdml.ensemble.stats.RobustnessStats`
(``cross_member``), a :class:`rdml.ensemble.stats.MemberSnapshot` (``ensemble_gradient``), or whatever
a new mode defines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Record(Protocol):
    """What a member publishes: its id, the step it is for, a schema version, its size; ``check`` refuses foreign versions."""

    member: int
    step: int
    schema: int

    @property
    def nbytes(self) -> int: ...

    def check(self) -> Record: ...


def others(records: Sequence[Any], k: int) -> list[Any]:
    """The records of every member but ``k``, in member order (what member ``k`` steps with)."""
    return [r for j, r in enumerate(records) if j != k]

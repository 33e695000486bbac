"""The test order of `pytest --shuffle SEED` (`make test-shuffled`): the modules in a
seeded random order, and each module's tests in a seeded random order among themselves.

Modules stay whole because their module-scoped fixtures train real cells and start real
jobs: interleaving them would rebuild each fixture many times. A failure seen only under
some seed is an order dependence (a thread count a fixture left behind, a global that a
test changed); rerun with that seed to see it again."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def shuffled(items: Sequence[T], module_of: Callable[[T], str], *, seed: int) -> list[T]:
    rng = random.Random(seed)
    modules: dict[str, list[T]] = {}
    for item in items:
        modules.setdefault(module_of(item), []).append(item)
    order = list(modules)
    rng.shuffle(order)
    out: list[T] = []
    for name in order:
        tests = modules[name]
        rng.shuffle(tests)
        out.extend(tests)
    return out

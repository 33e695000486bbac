"""`pytest --shuffle SEED` (tests/order.py, hooked in conftest.py): another order of
the same tests, each module's tests kept together, so a test that passes only after
another (state one leaves behind, a fixture another warmed) shows up."""

from __future__ import annotations

from tests.order import shuffled

IDS = [f"tests/test_{m}.py::test_{i}" for m in "abcd" for i in range(5)]


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def test_a_shuffle_is_a_permutation_with_each_module_in_one_run() -> None:
    out = shuffled(IDS, _module, seed=3)
    assert sorted(out) == sorted(IDS)
    runs = [_module(out[0])] + [_module(b) for a, b in zip(out, out[1:]) if _module(a) != _module(b)]
    assert len(runs) == len(set(runs)) == 4  # a module's module-scoped fixtures are built once


def test_a_seed_gives_one_order_and_other_seeds_others() -> None:
    assert shuffled(IDS, _module, seed=3) == shuffled(IDS, _module, seed=3)
    orders = {tuple(shuffled(IDS, _module, seed=s)) for s in range(20)}
    assert len(orders) == 20
    assert tuple(IDS) not in orders
    # both levels move: the modules' order, and the tests' order inside a module
    assert len({tuple(dict.fromkeys(map(_module, o))) for o in orders}) > 1
    assert len({tuple(t for t in o if _module(t) == "tests/test_a.py") for o in orders}) > 1

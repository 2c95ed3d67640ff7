"""Fuzz the input stage with mutated real files (benchmarks/fuzz.py, bounded here): every
outcome is a volume or a DicompipeError, never another exception, never a hang or a case
longer than 10 s. The larger campaign: ``python -m benchmarks.fuzz --cases 20000``."""
import pytest

from benchmarks import fuzz

CASES = 2000          # the bound: 2,000 cases in <= 3 min


@pytest.mark.slow
def test_fuzz_input_stage():
    res = fuzz.campaign(CASES, seed=15, max_seconds=10.0)
    assert res["cases"] == CASES
    assert res["failures"] == [], res["failures"][:5]
    assert res["slowest_case_cpu_s"] < 10.0
    assert res["outcomes"].get("volume", 0) > 0          # some mutants are still loadable
    assert res["cpu_s"] < 180                             # CPU time: robust on a busy machine


def test_fuzz_mutations_are_reproducible():
    corpus = fuzz.seeds()
    assert len(corpus) >= 10
    import random
    a = fuzz.mutate(*corpus[0], random.Random("s:1"))
    b = fuzz.mutate(*corpus[0], random.Random("s:1"))
    assert a == b

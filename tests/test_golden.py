"""Golden values: the first steps' losses of every objective on tiny models must not drift.

``tests/golden/losses.json`` holds, per case, every ``*_loss`` and the gradient norm of the first steps of a
real ``Trainer`` run (tiny-llm, the synthetic shards of ``conftest.write_tiny_shards``, fixed seeds). A
refactor must reproduce them; a deliberate change of the computation regenerates them with
``tests/golden/regenerate.py --why "..."``, which records the reason in the file.
"""

from __future__ import annotations

import json

import pytest

from tests.golden.regenerate import CASES, GOLDEN, run_case

GOLDEN_DATA = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_steps_equal_the_golden_values(work, name):
    objective, stage = CASES[name]
    got = run_case(objective, stage, work)
    expected = GOLDEN_DATA["cases"][name]
    assert len(got) == len(expected) == GOLDEN_DATA["steps"]
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert g.keys() == e.keys(), (name, step)
        for key in e:
            # same machine type and library versions: equal up to float reassociation noise
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-8), (name, step, key, g[key], e[key])


def test_every_report_reaches_the_log(work):
    """The objectives' diagnostics (not golden: they are reports) are logged next to the losses, finite."""
    import math

    log = work / "run-sea+basic+distill-finetune" / "log.jsonl"
    if not log.is_file():  # run alone (-k): train the case here
        run_case("sea+basic+distill", "finetune", work)
    records = [json.loads(line) for line in log.open()]
    keys = ["sea/pairs", "sea/pair_acc", "sea/temperature", "basic/attn_entropy", "distill/cos_encoder"]
    for record in records:
        assert all(math.isfinite(record[key]) for key in keys), record
        assert record["sea/pairs"] >= 2


def test_golden_values_record_why_they_changed():
    assert GOLDEN_DATA["history"] and all(entry["why"].strip() for entry in GOLDEN_DATA["history"])
    assert set(GOLDEN_DATA["cases"]) == set(CASES)

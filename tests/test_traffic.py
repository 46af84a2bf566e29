"""The Triton kernels' memory traffic per row, counted under the interpreter (benchmarks/traffic.py).

Each input class of the README's traffic table runs on a few rows: every kept row stays at or
under its class's target (7 units with the head/tail split, 8 where bracket passes are needed, 5
for FKL and RKL without statistics), an ignored row costs exactly one unit (its zero gradient),
and the bytes that are not logits or gradient (row records, the bracket buffer) stay small.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts the interpreter's loads and stores (TRITON_INTERPRET=1)", allow_module_level=True)

from benchmarks.traffic import CLASSES, SPLIT_TARGET, measure_class  # noqa: E402


@pytest.mark.parametrize("input_class", CLASSES, ids=[c.name for c in CLASSES])
def test_units_per_row_within_target(input_class):
    try:
        result = measure_class(input_class, rows=2 if input_class.default_rows > 4 else input_class.default_rows)
    except FileNotFoundError as missing:  # the real rows live in the project's shared folder
        pytest.skip(str(missing))
    kept = result["kept"]
    assert kept["total_max"] <= input_class.target + 1e-9, result
    # Every logit is read at least once per pass that needs it: 2 for loss and gradient.
    assert kept["teacher"] >= 2 and kept["student"] >= 2 and kept["gradient"] == 1, result
    if "ignored" in result:
        assert result["ignored"]["total_max"] == 1.0, result  # the zero gradient, nothing read
    assert result["other_units"] <= 3.0, result  # records and the bracket buffer (L2-resident scratch)


def test_top_path_rows_cost_exactly_seven_units():
    peaked = next(c for c in CLASSES if c.name.startswith("peaked"))
    result = measure_class(peaked, rows=2)
    assert result["kept"]["total_max"] == SPLIT_TARGET
    assert result["split_paths"] == {"top": 2}

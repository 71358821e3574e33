"""What kfp.local 2.17 does with nested ParallelFor and dsl.Collected, the constructs the arms DAG is built on.

Trivial components (no rewardtune), so the facts are kfp's own: a Collected fan-in works inside an outer loop
and over it, in iteration order; and an outer loop's item given to a task inside an inner loop arrives as the
INNER loop's item — why the DAG's per-checkpoint loop takes nothing from the per-arm loop.
"""

import pytest

pytest.importorskip("kfp")
from kfp import dsl, local  # noqa: E402


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def pair(outer: str, inner: str) -> str:
    return f"{outer}/{inner}"


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def join(items: list) -> str:
    return ",".join(items)


@dsl.pipeline
def nested(outer_items: list, inner_items: list) -> str:
    with dsl.ParallelFor(outer_items) as outer:
        with dsl.ParallelFor(inner_items) as inner:
            paired = pair(outer=outer, inner=inner)
        per_outer = join(items=dsl.Collected(paired.output))
    return join(items=dsl.Collected(per_outer.output)).output


def test_nested_loops_collect_in_order_and_the_outer_item_is_replaced_inside_the_inner_loop(tmp_path):
    from pipelines.run_local import print_restored

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with print_restored():
        result = nested(outer_items=["a", "b"], inner_items=["x", "y"]).output
    # a correct runner would give "a/x,a/y,b/x,b/y": the outer item is overwritten by the inner one
    assert result == "x/x,y/y,x/x,y/y"


def test_indented_print_restored_out_of_order_leaks_and_print_restored_undoes_it(capsys):
    """kfp.local's `indented_print` (entered around every task) restores the print it saw on entry; two tasks
    that overlap and finish first-in-first-out leave the second one's wrapper behind for good. This leak put
    28 spaces before every line a later test printed (CI, round 2). `print_restored` is run_local's guard."""
    import builtins

    from kfp.local import logging_utils

    from pipelines.run_local import print_restored

    original = builtins.print
    with print_restored():
        first, second = logging_utils.indented_print(), logging_utils.indented_print()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        assert builtins.print is not original  # kfp's own behaviour: the first task's wrapper stays installed
        print("inside")
    assert builtins.print is original
    print("after")
    assert capsys.readouterr().out.splitlines() == ["    inside", "after"]

"""benchmarks.int_items: the benchmarks' list flags, and one error: line for a bad one."""
import pytest

from benchmarks import int_items


def test_int_items_parses_ints_and_tuples():
    assert int_items("1,3,9", "--batches") == [1, 3, 9]
    assert int_items("9x576,3x2112", "--shapes", sep="x", parts=(2,)) == [(9, 576), (3, 2112)]
    assert int_items("1100,40@1856", "--rows_at", sep="@", parts=(1, 2)) == [(1100,), (40, 1856)]


@pytest.mark.parametrize("text, kw", [("1,x", {}), ("9by576", {"sep": "x", "parts": (2,)}),
                                      ("9x576x2", {"sep": "x", "parts": (2,)}), ("", {})])
def test_a_bad_value_is_one_error_line_and_exit_2(text, kw, capsys):
    with pytest.raises(SystemExit) as e:
        int_items(text, "--flag", form="the form", **kw)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --flag {text!r}: give {'the form'}"]

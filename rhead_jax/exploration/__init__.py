"""What each head copied, step by step: one self-contained page from a sweep with captures
(config.sweep.save_captures; rhead_jax.captures). The command is rhead_jax.explore.

    data = page_data(workdir, tests=None, heads=None)    # what goes on the page, as JSON-able data
    path = write_page(data, out_dir)                      # out_dir/explore.html

By concept: data.py (the tests and heads shown, and what the page holds of each: `page_data`) and
page.py (the page itself: `write_page`, its styles, markup and script).

The page (inline script and styles, nothing fetched; it works from file://): a list of tests; the
prompt around the needle and the generated answer as tokens, the answer span marked; the layer x
head grid coloured by the mean retrieval score (head_scores.json); picking a head shows, for each
generated token, the position the head attended most (top 1, the top k with weights on hover), the
copy events marked; picking a generated token lists every head that copied it at that step.

The copy events are computed here, in Python, with rhead_jax.scoring's own rule
(`captures.TestCapture.copy_events` -> `scoring.copy_events`) and embedded: the page draws them, it
does not decide them, so the page and the score cannot disagree (a test checks the events against
results.jsonl's copy counts, and tests/test_explore_browser.py checks the page's against both).

Bounded size: the step-by-step captures of `heads` only (default: the `top_heads` best by mean score
plus `zero_heads` heads that never copy, for contrast) and of `tests` (default: all, at most
`max_tests`, evenly spaced over the grid); every head's copy events (sparse) are on the page for
every test shown. The page says what it left out.
"""
from rhead_jax.exploration.data import MAX_TESTS, TOP_HEADS, ZERO_HEADS, page_data, select_heads, select_tests
from rhead_jax.exploration.page import write_page

__all__ = ["MAX_TESTS", "TOP_HEADS", "ZERO_HEADS", "page_data", "select_heads", "select_tests", "write_page"]

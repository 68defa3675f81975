"""rhead_jax.engine: stop tokens, batching, the shared prefix (exact against a plain prefill),
padding rows, and the result store."""
from __future__ import annotations

import numpy as np
import pytest

from rhead_jax import engine as engine_lib
from rhead_jax import host_memory, prefix
from rhead_jax.batches import make_batches, round_up
from rhead_jax.config import default_config, validate
from rhead_jax.engine import Engine, ResultStore
from rhead_jax.errors import UserError
from tests.helpers.tiny_smol import make_tiny_smol


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_tiny_smol(tmp_path_factory.mktemp("tiny_engine") / "tiny-smol", sharpen=False, hidden_size=32,
                       intermediate_size=64, num_attention_heads=4)
    c = default_config()
    c.model.path, c.model.name = str(d), "tiny"
    c.sweep.lengths, c.sweep.depths = (300, 400), (0, 100)
    c.sweep.max_new_tokens, c.sweep.prefill_chunk, c.sweep.pad_multiple = 5, 128, 32
    c.sweep.q_chunk = c.sweep.k_chunk = 64
    return Engine(validate(c))


def test_stop_tokens(engine):
    tok = engine.tokenizer
    faithful = engine_lib.stop_tokens(tok, faithful=True)
    default = engine_lib.stop_tokens(tok, faithful=False)
    assert all(tok.decode([i]) == "\n" for i in faithful) and faithful
    assert set(faithful) < set(default) and tok.eos_token_id in default
    assert any(tok.decode([i]) == "\n\n" for i in default)


def test_plan_and_batches(engine):
    inst = engine.plan_needles()
    assert [i.length for i in inst] == [300] * 6 + [400] * 6
    assert make_batches(inst, 4) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]  # never across lengths
    assert make_batches(inst, {300: 6, 400: 4}) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]   # per length


def test_batch_sizes_fit_the_kv_budget(engine):
    """config.sweep.batch_kv_mib: a length decodes as many rows as its KV cache fits, at most
    batch_size, at least one; 0 = batch_size everywhere."""
    inst = engine.plan_needles()
    spec = engine.spec(capture=True)
    s, c = engine.config.sweep, engine.cfg
    slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    row = {n: slot * engine_lib.cache_size_for(round_up(max(i.num_prompt_tokens for i in inst
                                                                       if i.length == n), s.pad_multiple), spec)
           for n in (300, 400)}
    assert row[400] > row[300]
    old = (s.batch_size, s.batch_kv_mib)
    try:
        s.batch_size, s.batch_kv_mib = 6, 0
        assert engine.batch_sizes(inst, spec) == {300: 6, 400: 6}
        s.batch_kv_mib = 5 * row[300] / 2 ** 20            # 5 rows of 300 tokens, fewer of 400
        fits = 5 * row[300] // row[400]
        assert 1 < fits < 5
        sizes = engine.batch_sizes(inst, spec)
        assert sizes[300] == 3 and sizes[400] == -(-6 // -(-6 // fits))    # 6 tests: 3 + 3, not 5 + 1
        s.batch_kv_mib = 1e-6
        assert engine.batch_sizes(inst, spec) == {300: 1, 400: 1}
    finally:
        s.batch_size, s.batch_kv_mib = old


def test_cpu_engine_hands_freed_host_memory_back(engine):
    """On XLA:CPU with glibc the engine maps blocks of 1 MiB and more on their own and trims the heap
    after each batch (host_memory.release_freed_memory): freed pages leave the process's RSS."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    assert engine.trim

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    blocks = [bytearray(b"x" * (256 << 10)) for _ in range(240)]   # 60 MiB of heap blocks (< 1 MiB each)
    del blocks[::2]                                                # holes between live blocks: not trimmable
    before = rss_kib()                                             # by shrinking the heap's top alone
    host_memory.release_freed_memory()
    assert before - rss_kib() > 15 << 10                           # >15 of the 30 MiB freed went back
    del blocks


def test_rows_do_not_depend_on_the_batch(engine):
    """A row's generation and captured slots are the same decoded in a batch of 6 as of 3 (what lets
    a config change its batch sizes without changing a score)."""
    inst = [i for i in engine.plan_needles() if i.length == 300]
    spec = engine.spec(capture=True)
    rows = [i.prompt_ids for i in inst]
    six = engine.generate(rows, spec, batch_size=6)
    threes = [engine.generate(rows[k:k + 3], spec, batch_size=3) for k in (0, 3)]
    np.testing.assert_array_equal(six.tokens, np.concatenate([t.tokens for t in threes]))
    np.testing.assert_array_equal(six.topk_index, np.concatenate([t.topk_index for t in threes]))


def test_shared_prefix_and_padding_rows_are_exact(engine):
    inst = [i for i in engine.plan_needles() if i.length == 300]
    spec = engine.spec(capture=True)
    shared = engine.shared_prefix(inst, spec)
    assert engine.shared_prefix(inst, spec) is shared  # built once
    assert max(shared.lengths.values()) > 100
    rows = [i.prompt_ids for i in inst[:3]]
    keys = [i.key for i in inst[:3]]
    with_prefix = engine.generate(rows, spec, batch_size=4, shared=shared, keys=keys)  # one padding row
    plain = engine.generate(rows, spec, batch_size=3)
    assert with_prefix.tokens.shape[0] == 3 and (with_prefix.starts > 0).all() and (plain.starts == 0).all()
    np.testing.assert_array_equal(with_prefix.tokens, plain.tokens)
    np.testing.assert_array_equal(with_prefix.topk_index, plain.topk_index)
    np.testing.assert_allclose(with_prefix.topk_weight, plain.topk_weight, rtol=1e-5, atol=1e-6)
    assert engine.generate(rows, engine.spec(capture=False), batch_size=3).topk_index is None


def test_choose_branches():
    """Depth-0 prompts of one needle: the shorter haystack is a prefix of the longer, the question
    differs. The reference prompt shares only the template with them."""
    hay = np.arange(100, 400)
    short = np.concatenate([[1, 2, 7], hay[:100], [9, 9]])       # template, needle, haystack, question
    long_ = np.concatenate([[1, 2, 7], hay[:250], [9, 9]])
    other = np.concatenate([[1, 2, 8], hay[:200], [9, 9]])       # another needle
    ids = [short, long_, other]
    caps, base = [len(x) - 1 for x in ids], [2, 2, 2]
    assert prefix.choose_branches(ids, caps, base, 0) == ([], base, [-1, -1, -1])
    branches, starts, source = prefix.choose_branches(ids, caps, base, 4)
    assert len(branches) == 1 and source[2] == -1 and starts[2] == 2    # one branch; `other` gains nothing
    c, n = branches[0]
    # the short prompt but its last token (decoded, not prefilled); the long one shares it up to the question
    assert c == 0 and source[:2] == [0, 0] and n == 104 and starts[:2] == [104, 103]
    before = sum(cp - b for cp, b in zip(caps, base))
    assert sum(cp - st for cp, st in zip(caps, starts)) + n < before - 64
    assert prefix.choose_branches(ids, caps, base, 4, min_gain=10 ** 6)[0] == []


def test_result_store_pins_its_configuration(tmp_path):
    store = ResultStore(str(tmp_path), '{"a": 1}')
    assert not store.done(0)
    store.write(0, [{"x": 1}])
    assert store.done(0) and store.read(0) == [{"x": 1}]
    ResultStore(str(tmp_path), '{"a": 1}')  # same pin: resumes
    with pytest.raises(UserError, match="different configuration"):
        ResultStore(str(tmp_path), '{"a": 2}')


def test_prefill_pieces():
    from rhead_jax.models.generate import prefill_pieces, prefill_widths

    w = prefill_widths(1024)
    assert w == (1024, 512, 256, 128) and prefill_widths(4096, 2) == (4096, 2048)
    assert prefill_pieces(0, w) == [] and prefill_pieces(1, w) == [128]
    assert prefill_pieces(1900, w) == [1024, 512, 256, 128]  # 1920: 20 tokens of padding
    assert prefill_pieces(2048, w) == [1024, 1024] and prefill_pieces(640, w) == [512, 128]
    for n in range(0, 5000, 37):
        p = prefill_pieces(n, w)
        assert n <= sum(p) < n + 128 and all(x in w for x in p)


def test_compiled_programs_are_bounded_per_length(tmp_path):
    """Over a grid of 2 lengths x 5 depths x 3 needles (6 batches), the sweep compiles a fixed set
    of programs per length -- cache set-up, <= 4 prefill widths, one decode loop -- plus the shared
    prefix's prefill and scoring: the count does not grow with depths or needles."""
    from rhead_jax.detection import run_sweep
    from rhead_jax.compilation import count_compiles

    d = make_tiny_smol(tmp_path / "tiny-smol", sharpen=False, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4)

    def compiles(depths, batch_size, wd, branches=0):
        c = default_config()
        c.model.path, c.model.name, c.compile_cache = str(d), "tiny", False
        c.sweep.lengths, c.sweep.depths = (300, 400), depths
        c.sweep.max_new_tokens, c.sweep.prefill_chunk, c.sweep.pad_multiple = 4, 128, 32
        c.sweep.q_chunk = c.sweep.k_chunk = 64
        c.sweep.batch_size, c.sweep.prefix_branches = batch_size, branches
        stats = count_compiles()
        before = stats.programs
        run_sweep(validate(c), str(tmp_path / wd))
        return stats.programs - before

    few = compiles((0, 100), 3, "few")       # 2 lengths x 2 depths x 3 needles: 4 batches
    many = compiles((0, 25, 50, 75, 100), 3, "many")  # 2 lengths x 5 depths: 10 batches
    # the second run reuses the in-process jit caches of nothing (a new Engine), so both counts are
    # whole sweeps; per length: rows + <= 4 prefill widths + decode (+ copy-count scoring shapes)
    assert many <= few + 2, (few, many)
    assert many <= 2 * (1 + 4 + 1 + 2) + 4, many
    # prefix branches: per length a second set-up (rows from the branches); once, the branch cache
    # and its prefill widths (rhead_jax.dryrun.planner.grid_programs)
    branched = compiles((0, 25, 50, 75, 100), 3, "branched", branches=4)
    assert branched <= many + 2 * 1 + 1 + 4, (many, branched)


def test_cache_write_forms_agree(engine):
    """The TPU forms of the cache writes (slot select, dynamic_update_slice) and the scatter the
    engine uses on CPU give the same generations: tokens and attended slots bit for bit, weights to
    1 ulp (the two programs fuse differently in XLA:CPU; seen: one weight of 120 off by 4.7e-10)."""
    import dataclasses

    inst = [i for i in engine.plan_needles() if i.length == 300]
    spec = engine.spec(capture=True)
    assert spec.attn.cache_writes == "scatter"  # on CPU
    tpu = dataclasses.replace(spec, attn=dataclasses.replace(spec.attn, cache_writes="tpu"))
    rows = [i.prompt_ids for i in inst[:3]]
    a = engine.generate(rows, spec, batch_size=3)
    b = engine.generate(rows, tpu, batch_size=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.topk_index, b.topk_index)
    np.testing.assert_allclose(a.topk_weight, b.topk_weight, rtol=2.5e-7, atol=0)

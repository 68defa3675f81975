"""rhead_jax.detectors: hand-built attention patterns score as expected, the sequences, and a tiny
model's files against the dense reference from full attention probabilities."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rhead_jax import detectors, rankings
from rhead_jax.config import default_config, validate
from rhead_jax.detectors.sequences import Sequences, bos_id
from rhead_jax.errors import UserError
from tests.helpers.needle_tokenizer import make_tokenizer
from tests.helpers.tiny_smol import make_tiny_smol


def _seq(n=5, r=3, bos=True) -> Sequences:
    block = np.array([11, 5, 42, 8, 23][:n])
    return Sequences(tokens=np.concatenate([[1] if bos else [], np.tile(block, r)])[None].astype(np.int32),
                     length=n, repeats=r, start=int(bos))


def _pattern(T, key_of) -> np.ndarray:
    """[T, T] attention rows: query q puts all its weight on key_of(q) (BOS/first key when None)."""
    p = np.zeros((T, T))
    for q in range(T):
        k = key_of(q)
        p[q, 0 if k is None else k] = 1
    return p


def test_hand_built_patterns_score_as_expected():
    seq = _seq()
    n, s, T = seq.length, seq.start, seq.num_tokens
    second = lambda q: q >= s + n  # noqa: E731
    heads = {
        "induction": _pattern(T, lambda q: q - n + 1 if second(q) else None),
        "previous": _pattern(T, lambda q: q - 1 if q else None),
        "duplicate": _pattern(T, lambda q: q - n if second(q) else None),
        "uniform": np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None],
    }
    heads["half"] = 0.5 * heads["induction"] + 0.5 * heads["previous"]
    probs = np.stack(list(heads.values()))[None, None]                      # [L=1, B=1, H, T, T]
    got = detectors.scores_from_probs(probs, detectors.detector_targets(1, seq))[0, 0]   # [H, M]
    score = {name: dict(zip(detectors.DETECTORS, got[h])) for h, name in enumerate(heads)}
    assert score["induction"] == pytest.approx({"induction": 1, "duplicate": 0, "previous": 1 / (T - 1)})
    assert score["previous"] == pytest.approx({"induction": 0, "duplicate": 0, "previous": 1})
    assert score["duplicate"] == pytest.approx({"induction": 0, "duplicate": 1, "previous": 1 / (T - 1)})
    assert score["half"] == pytest.approx({"induction": 0.5, "duplicate": 0, "previous": 0.5 + 0.5 / (T - 1)})
    # uniform attention: the share of visible keys that are targets, counted from the tokens
    tok = seq.tokens[0]
    ind = np.mean([sum(tok[k - 1] == tok[q] for k in range(1, q + 1)) / (q + 1) for q in range(s + n, T)])
    dup = np.mean([sum(tok[k] == tok[q] for k in range(q)) / (q + 1) for q in range(s + n, T)])
    prev = np.mean([1 / (q + 1) for q in range(1, T)])
    assert score["uniform"] == pytest.approx({"induction": ind, "duplicate": dup, "previous": prev})


def test_random_repeats():
    tok = make_tokenizer()          # adds a BOS
    assert bos_id(tok) == tok.bos_token_id
    seq = detectors.random_repeats(tok, 5000, length=50, repeats=3, samples=2, seed=7)
    assert seq.tokens.shape == (2, 151) and seq.start == 1 and (seq.tokens[:, 0] == tok.bos_token_id).all()
    special = set(tok.all_special_ids)
    for row in seq.tokens:
        block = row[1:51]
        assert len(set(block.tolist())) == 50 and not special & set(row[1:].tolist())
        np.testing.assert_array_equal(row[1:], np.tile(block, 3))
        assert row.max() < len(tok)
    assert not np.array_equal(seq.tokens[0], seq.tokens[1])
    again = detectors.random_repeats(tok, 5000, length=50, repeats=3, samples=3, seed=7)
    np.testing.assert_array_equal(again.tokens[:2], seq.tokens)   # sample s depends on (seed, s) only
    with pytest.raises(UserError, match="exceed the model's 100 positions"):
        detectors.random_repeats(tok, 5000, length=50, repeats=3, samples=1, seed=0, max_positions=100)
    with pytest.raises(UserError, match="ordinary token ids"):
        detectors.random_repeats(tok, 5000, length=len(tok), repeats=2, samples=1, seed=0)


def test_config_is_validated():
    c = default_config()
    c.detectors.repeats = 1
    with pytest.raises(UserError, match="config.detectors.repeats must be an integer >= 2"):
        validate(c)
    c = default_config()
    c.sweep.extra_scores = ("mass", "nope")
    with pytest.raises(UserError, match=r"extra_scores must list distinct names out of \('mass', 'query', 'logit', 'dla', 'spatial'\)"):
        validate(c)
    c.sweep.extra_scores = ("query", "mass")
    validate(c)
    from rhead_jax.config import EXTRA_SCORES
    from rhead_jax.engine import EXTRA_SCORES as MEANING

    assert set(EXTRA_SCORES) == set(MEANING)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_detectors") / "tiny-smol", hidden_size=32,
                          intermediate_size=64, num_attention_heads=4, max_position_embeddings=512)


def _config(model_dir, **detector):
    c = default_config()
    c.model.path, c.model.name = str(model_dir), "tiny"
    c.sweep.batch_size, c.sweep.prefill_chunk, c.sweep.q_chunk, c.sweep.k_chunk = 2, 64, 32, 32
    for k, v in {"length": 40, "repeats": 3, "samples": 3, "seed": 1, **detector}.items():
        setattr(c.detectors, k, v)
    return validate(c)


def test_files_equal_the_dense_reference(tiny_dir, tmp_path):
    """3 samples of 40 x 3 tokens in calls of 2 rows (one padding row), prefilled in pieces of 64 with
    tiles of 32: the files equal the scores of the full probabilities; rankings read them."""
    from rhead_jax.checkpoints import load_model
    from rhead_jax.models.cache import CaptureSpec
    from rhead_jax.models.decoder import forward

    config = _config(tiny_dir)
    model = load_model(str(tiny_dir))
    summary = detectors.run_detectors(config, str(tmp_path), model=model)
    seq = detectors.random_repeats(model.tokenizer, model.cfg.vocab_size, length=40, repeats=3, samples=3, seed=1)
    assert summary["tokens_per_sample"] == seq.num_tokens == 120 and not summary["bos"]   # SmolLM2 adds no BOS
    tokens = jnp.asarray(seq.tokens)
    _, _, caps = forward(model.params, model.cfg, tokens, jnp.tile(jnp.arange(120), (3, 1)),
                         capture=CaptureSpec(full_probs=True), logits="none")
    ref = detectors.scores_from_probs(np.asarray(caps.probs)[..., :120], detectors.detector_targets(3, seq))
    L, H = model.cfg.num_layers, model.cfg.num_heads
    for m, name in enumerate(detectors.DETECTORS):
        hs = json.loads((tmp_path / f"head_scores_{name}.json").read_text())
        assert list(hs) == [f"{l}-{h}" for l in range(L) for h in range(H)] and all(len(v) == 3 for v in hs.values())
        got = np.array([[hs[f"{l}-{h}"] for h in range(H)] for l in range(L)])        # [L, H, samples]
        np.testing.assert_allclose(got, ref[..., m].transpose(0, 2, 1), rtol=1e-4, atol=1e-6)
        r = rankings.read_ranking(tmp_path / f"head_scores_{name}.json")
        np.testing.assert_allclose(r.scores, got.mean(-1), rtol=1e-12)
        assert summary["top_heads"][name][0][1] == pytest.approx(got.mean(-1).max(), abs=1e-4)
    assert json.loads((tmp_path / "summary.json").read_text())["samples"] == 3
    assert "induction" in detectors.format_table({n: json.loads((tmp_path / f"head_scores_{n}.json").read_text())
                                                  for n in detectors.DETECTORS})

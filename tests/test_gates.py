"""rhead_jax.gates: the two-output chunked attention, the gated decoder, training, files, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rhead_jax import rankings
from rhead_jax.config import default_config, validate
from rhead_jax.errors import UserError
from rhead_jax.gates.attention import dense_full_and_streaming, full_and_streaming
from rhead_jax.gates.model import full_hidden, gated_hidden
from rhead_jax.gates.train import StepSettings, make_optimizer, train_step
from rhead_jax.models.attention import NO_WINDOW, dense_attention
from rhead_jax.models.config import ModelConfig
from rhead_jax.models.decoder import forward, param_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True)


def _qkv(B=2, T=70, S=None, K=2, G=3, D=8, seed=0):
    r = np.random.RandomState(seed)
    S = S or T
    f = lambda *s: jnp.asarray(r.randn(*s), jnp.float32)  # noqa: E731
    return f(B, T, K, G, D), f(B, K, S, D), f(B, K, S, D)


@pytest.fixture(scope="module")
def tiny():
    """TINY with random params (std 0.1 matrices: attention that picks keys; norms at 1)."""
    shapes = param_shapes(TINY)
    leaves, tree = jax.tree.flatten(shapes)
    r = np.random.RandomState(0)
    params = [jnp.ones(l.shape) if l.ndim == 1 or (l.ndim == 2 and l.shape[0] == TINY.num_layers)
              else jnp.asarray(r.randn(*l.shape) * 0.1, jnp.float32) for l in leaves]
    return TINY, jax.tree.unflatten(tree, params)


@partial(jax.jit, static_argnames=("cfg", "sink", "recent", "chunk"))
def _gated(params, tok, pos, gates, *, cfg, sink, recent, chunk=64):
    return gated_hidden(params, cfg, tok, pos, gates, sink=sink, recent=recent, chunk=chunk)


@partial(jax.jit, static_argnames=("cfg", "chunk"))
def _full(params, tok, pos, *, cfg, chunk=64):
    return full_hidden(params, cfg, tok, pos, chunk=chunk)


def _tokens(T, B=1, seed=0):
    tok = jnp.asarray(np.random.RandomState(seed).randint(0, TINY.vocab_size, (B, T)), jnp.int32)
    return tok, jnp.broadcast_to(jnp.arange(T), (B, T))


# ----------------------------------------------------------------------------- attention


def test_chunked_two_outputs_and_grads_equal_dense():
    """Several chunks (T = 70, chunk 16, padded), padding rows (position -1), with and without a
    sliding window; values and the gradient of a loss of both outputs w.r.t. q, k, v."""
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(70), (2, 70))
    pos = pos.at[1, 60:].set(-1)                       # row 1 ends in padding
    kw = dict(scale=8 ** -0.5, sink=4, recent=10)

    def chunked(q, k, v, window):
        return full_and_streaming(q, k, v, pos, pos, chunk=16, window=window, **kw)

    def dense(q, k, v, window):
        return dense_full_and_streaming(q, k, v, pos, pos, window=window, **kw)

    def loss(fn):
        def l(q, k, v, window):
            a, b = fn(q, k, v, window)
            return jnp.sum(jnp.sin(a) * jnp.cos(b) + 0.3 * b * b)
        return l

    run_c, run_d = jax.jit(chunked), jax.jit(dense)
    grad_c, grad_d = jax.jit(jax.grad(loss(chunked), (0, 1, 2))), jax.jit(jax.grad(loss(dense), (0, 1, 2)))
    for window in (NO_WINDOW, 21):
        w = jnp.int32(window)
        for a, b in zip(run_c(q, k, v, w), run_d(q, k, v, w)):
            np.testing.assert_allclose(a, b, atol=2e-6)
        for a, b in zip(grad_c(q, k, v, w), grad_d(q, k, v, w)):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_streaming_is_dense_attention_over_sink_and_recent():
    """The streaming output is models.attention.dense_attention with window = recent and the sink;
    the full one is plain causal dense attention."""
    q, k, v = _qkv(T=100, seed=1)
    pos = jnp.broadcast_to(jnp.arange(100), (2, 100))
    run = jax.jit(lambda q, k, v: full_and_streaming(q, k, v, pos, pos, scale=0.3, sink=5, recent=17, chunk=32))
    f, s = run(q, k, v)
    ref_s, _ = dense_attention(q, k, v, pos, pos, window=17, sink=5, scale=0.3)
    ref_f, _ = dense_attention(q, k, v, pos, pos, window=NO_WINDOW, scale=0.3)
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    np.testing.assert_allclose(f, ref_f, atol=2e-6)


# ----------------------------------------------------------------------------- the gated model


def test_gates_one_is_the_model(tiny):
    """alpha = 1 everywhere: the decoder's own final hidden states (its logits, and full_hidden)."""
    cfg, params = tiny
    tok, pos = _tokens(192, B=2)
    h = _gated(params, tok, pos, jnp.ones((3, 2)), cfg=cfg, sink=4, recent=16)
    ref, _, _ = jax.jit(partial(forward, cfg=cfg))(params, tokens=tok, positions=pos)
    head = params["embed"].T
    logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(logits, ref, atol=1e-4 * max(1.0, float(jnp.abs(ref).max())))
    np.testing.assert_allclose(h, _full(params, tok, pos, cfg=cfg), atol=1e-5)


def test_gates_zero_with_a_window_covering_everything_is_the_model(tiny):
    cfg, params = tiny
    tok, pos = _tokens(192, B=2)
    ref = _full(params, tok, pos, cfg=cfg)
    h0 = _gated(params, tok, pos, jnp.zeros((3, 2)), cfg=cfg, sink=8, recent=184)
    np.testing.assert_allclose(h0, ref, atol=1e-5)
    # and a window that does not cover it changes the output
    h1 = _gated(params, tok, pos, jnp.zeros((3, 2)), cfg=cfg, sink=4, recent=16)
    assert float(jnp.abs(h1 - ref).max()) > 1e-3


def test_gates_below_one_and_sliding_windows(tiny):
    """A gate below 1 changes the output; on a sliding-window model (Mistral-like) gates at 1 are
    still the model (the streaming mask stays inside the layer's window)."""
    cfg, params = tiny
    tok, pos = _tokens(192, B=2)
    g = jnp.ones((3, 2)).at[1, 0].set(0.25)
    h = _gated(params, tok, pos, g, cfg=cfg, sink=4, recent=16)
    ref = _full(params, tok, pos, cfg=cfg)
    assert float(jnp.abs(h - ref).max()) > 1e-4
    cfg_w = cfg.replace(sliding_window=(48, None, 48))
    ref_w = _full(params, tok, pos, cfg=cfg_w)
    np.testing.assert_allclose(_gated(params, tok, pos, jnp.ones((3, 2)), cfg=cfg_w, sink=4, recent=16), ref_w,
                               atol=1e-5)
    logits = jax.jit(partial(forward, cfg=cfg_w))(params, tokens=tok, positions=pos)[0]
    np.testing.assert_allclose(jnp.einsum("btd,dv->btv", ref_w, params["embed"].T), logits,
                               atol=1e-4 * max(1.0, float(jnp.abs(logits).max())))
    assert float(jnp.abs(ref_w - ref).max()) > 1e-3   # the window matters on these prompts


# ----------------------------------------------------------------------------- training


def _step_fn(cfg, g):
    return jax.jit(partial(train_step, cfg=cfg, optimizer=make_optimizer(g), s=StepSettings.from_config(g)))


def test_train_steps_lower_the_loss(tiny):
    cfg, params = tiny
    g = default_config().gates
    g.steps, g.lr, g.l1, g.sink, g.recent, g.chunk = 30, 0.05, 0.0, 4, 16, 64
    tok, _ = _tokens(128, seed=3)
    mask = jnp.zeros((1, 128), bool).at[:, 96:].set(True)
    step = _step_fn(cfg, g)
    gates = jnp.full((3, 2), 0.3, jnp.float32)  # not weakly typed: the outputs are not, so one program
    opt = make_optimizer(g).init(gates)
    losses = []
    for _ in range(10):
        gates, opt, m = step(gates, opt, params, tok, mask)
        losses.append(float(m["distill"]))
        assert 0.0 <= float(gates.min()) and float(gates.max()) <= 1.0
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(gates.mean()) > 0.3  # no L1: the gates go up towards the full model


def test_train_step_memory_is_linear_in_T():
    """The compiled train step at T = 2048 needs far less temp memory than one layer's dense
    attention probabilities (T x T x H x 4 bytes); the same step with dense attention does not."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=4, max_position_embeddings=4096)
    g = default_config().gates
    g.sink, g.recent, g.chunk = 16, 64, 128
    params = param_shapes(cfg)
    T = 2048
    gates = jax.ShapeDtypeStruct((2, 2), jnp.float32)
    opt = jax.eval_shape(make_optimizer(g).init, gates)
    tok = jax.ShapeDtypeStruct((1, T), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, T), jnp.bool_)
    temp = _step_fn(cfg, g).lower(gates, opt, params, tok, mask).compile().memory_analysis().temp_size_in_bytes
    dense_bytes = T * T * cfg.num_heads * 4
    assert temp < dense_bytes / 8, (temp, dense_bytes)
    # the control: the gradient of one layer's dense two-output attention does hold T x T arrays
    q = jax.ShapeDtypeStruct((1, T, 2, 4, 4), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 2, T, 4), jnp.float32)
    pos = jnp.arange(T)[None]

    def dense_loss(q, k, v):
        f, s = dense_full_and_streaming(q, k, v, pos, pos, scale=0.5, sink=16, recent=64)
        return jnp.sum(f * s)

    dense_grad = jax.jit(jax.grad(dense_loss, (0, 1, 2)))
    dense_temp = dense_grad.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    assert dense_temp > dense_bytes > 8 * temp, (dense_temp, dense_bytes, temp)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.helpers.tiny_smol import make_tiny_smol

    return make_tiny_smol(tmp_path_factory.mktemp("gates") / "tiny", hidden_size=32, intermediate_size=64,
                          num_attention_heads=4, max_position_embeddings=1024)


def _config(model_dir, **gates):
    c = default_config()
    c.model.path, c.model.name = str(model_dir), "tiny"
    g = c.gates
    g.steps, g.min_length, g.max_length, g.passkeys, g.passkey_words = 6, 128, 128, 2, 4
    g.sink, g.recent, g.chunk, g.checkpoint_every, g.lr = 4, 16, 128, 2, 0.05
    for k, v in gates.items():
        g[k] = v
    return validate(c)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from rhead_jax.checkpoints import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def reference_run(tiny_dir, model, tmp_path_factory):
    from rhead_jax.gates.train import run_gates

    wd = tmp_path_factory.mktemp("ref")
    return wd, run_gates(_config(tiny_dir), str(wd), model=model)


def test_run_writes_the_files(reference_run):
    wd, result = reference_run
    gates = np.asarray(result["gates"])
    assert gates.shape == (2, 2) and result["steps"] == 6 and len(result["widths"]) == 1
    np.testing.assert_array_equal(rankings.read_gates_tsv(wd / "full_attention_heads.tsv"), gates)  # round trip
    assert rankings.read_ranking(wd / "full_attention_heads.tsv").kind == "kv"
    doc = json.loads((wd / "gates.json").read_text())
    assert doc["gates"] == result["gates"] and doc["config"]["gates"]["steps"] == 6
    assert doc["gate_summary"]["count"] == 4 and "last" in doc["loss_summary"]
    log = [json.loads(l) for l in (wd / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["length"] == result["widths"][0] for r in log)
    assert (wd / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(wd.rglob(".*tmp*"))


def test_killed_run_resumes_to_the_same_gates(tiny_dir, model, reference_run, tmp_path):
    from rhead_jax.gates.train import run_gates

    ref_wd, ref = reference_run
    wd = tmp_path / "wd"
    part = run_gates(_config(tiny_dir), str(wd), model=model, stop_after=3)   # "killed" after step 3
    assert part["step"] == 3 and not (wd / "gates.json").exists()
    assert len((wd / "loss.jsonl").read_text().splitlines()) == 3          # logged past its checkpoint (2)
    resumed = run_gates(_config(tiny_dir), str(wd), model=model)
    assert resumed["resumed_from"] == 2
    assert resumed["gates"] == ref["gates"]                                  # bit-identical
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "step_s"}  # noqa: E731
                       for l in p.read_text().splitlines()]
    assert strip(wd / "loss.jsonl") == strip(ref_wd / "loss.jsonl")
    with pytest.raises(UserError, match="different configuration"):
        run_gates(_config(tiny_dir, seed=1), str(wd), model=model)


def test_data_is_a_function_of_seed_and_step(model):
    from rhead_jax.gates.data import PasskeyData
    from rhead_jax.needle.haystack import load_haystack

    g = default_config().gates
    g.min_length, g.max_length, g.passkeys, g.passkey_words = 100, 900, 3, 6
    a = PasskeyData(model.tokenizer, load_haystack(None), g, chunk=128)
    b = PasskeyData(model.tokenizer, load_haystack(None), g, chunk=128)
    assert a.widths == sorted(set(a.widths)) and all(w % 128 == 0 for w in a.widths) and len(a.widths) > 3
    seen = set()
    for s in (0, 1, 7, 30):
        ea, eb = a.example(s), b.example(s)
        np.testing.assert_array_equal(ea.tokens, eb.tokens)
        assert ea.length in a.widths and (~ea.loss_mask).sum() >= g.min_length
        assert np.all(ea.depths >= 0.05) and np.all(ea.depths <= 0.95) and np.all(np.diff(ea.depths) > 0)
        text = model.tokenizer.decode(ea.tokens[ea.loss_mask].tolist())
        assert text.count("Passkey:") == 3 and "third passkey" in text
        seen.add(ea.tokens.tobytes())
    assert len(seen) == 4
    # one epoch visits every width once
    assert sorted(a.width_at(s) for s in range(len(a.widths))) == a.widths


def test_bad_gates_config_is_one_error_line(tmp_path):
    for override, fragment in (("--config.gates.passkeys=0", "config.gates.passkeys"),
                               ("--config.gates.max_length=10", "config.gates.max_length"),
                               ("--config.gates.lr=-1.0", "lr > 0")):
        p = subprocess.run([sys.executable, "-m", "rhead_jax.gates", "--config", "configs/smollm2_135m.py",
                            "--workdir", str(tmp_path / "w"), override], cwd=REPO, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]


def test_meshes_match_single_device(tiny_dir, tmp_path):
    """A few train steps with params sharded on 8 simulated devices give the one-device gates."""
    meshes = ["1,1,1", "2,4,1"]   # 2 data x 4 model: q heads and MLP columns split, KV heads replicated
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-m", "tests.helpers.gates_sharded_check", "--model_dir", str(tiny_dir),
                          "--workroot", str(tmp_path), "--meshes", *meshes], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    ref = res["1,1,1"]
    assert np.asarray(ref["gates"]).min() < 1.0  # the gates moved
    for m in meshes[1:]:
        np.testing.assert_allclose(res[m]["gates"], ref["gates"], atol=1e-5, err_msg=m)
        np.testing.assert_allclose(res[m]["distill"], ref["distill"], rtol=1e-3, atol=1e-7, err_msg=m)


@pytest.mark.slow
def test_real_weights_gates_one_and_two_steps(smollm_dir, tmp_path):
    """SmolLM2-135M-Instruct: gates at 1 are the model (its logits), and two train steps of the
    shipped config's recipe at 512 tokens run, move the gates down and write the files."""
    from rhead_jax.checkpoints import load_model
    from rhead_jax.gates.train import run_gates

    model = load_model(str(smollm_dir))
    cfg, params = model.cfg, model.params
    tok = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 300)), jnp.int32)
    pos = jnp.arange(300)[None]
    h = _gated(params, tok, pos, jnp.ones((cfg.num_layers, cfg.num_kv_heads)), cfg=cfg, sink=32, recent=128,
               chunk=128)
    ref = jax.jit(partial(forward, cfg=cfg))(params, tokens=tok, positions=pos)[0]
    logits = jnp.einsum("btd,dv->btv", h, params["embed"].T, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(logits, ref, atol=1e-3 * max(1.0, float(jnp.abs(ref).max())))

    import importlib.util

    spec = importlib.util.spec_from_file_location("smol", REPO / "configs" / "smollm2_135m.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = str(smollm_dir)
    c.gates.steps, c.gates.min_length, c.gates.max_length = 2, 200, 200
    result = run_gates(validate(c), str(tmp_path), model=model)
    assert result["widths"] == [512] and np.asarray(result["gates"]).max() < 1.0
    assert rankings.read_gates_tsv(tmp_path / "full_attention_heads.tsv").shape == (30, 3)

"""Training the gates: loss, optimizer, the jitted step, checkpoints and the run.

The recipe is DuoAttention's (arXiv 2410.10819; mit-han-lab/duo-attention duo_attn/train.py and
duo_attn/loss.py at fe93c31), with the model frozen and batch 1:
  - loss = distill + l1 * reg, where distill is the squared difference of the final hidden states
    (after the final norm) of the model itself and of the gated model, averaged over the hidden
    size and over the QA tokens (theirs: `.pow(2).mean(dim=-1).sum() / num_labels`), and
    reg = mean |alpha| over all L x K gates (their `l1_loss`: `x.abs().sum() / x.numel()`);
  - AdamW with weight decay 0 (theirs: `torch.optim.AdamW(..., weight_decay=0)`; optax's
    default would be 1e-4), betas (0.9, 0.999), eps 1e-8 (torch's and optax's defaults);
  - their learning-rate schedule (`LambdaLR`): lr x min(1, max((s+1)/(N//5), 0.1),
    max((N-s)/(N//5), 0.1)) at update s of N: a linear warm-up from 0.1 x lr over the first
    fifth of the steps and a linear decay back to 0.1 x lr over the last fifth;
  - gates start at 1.0 and are clipped to [0, 1] after every update (theirs clamp in place before
    each forward, which is the same except that their final gates are saved unclamped: the
    published TSVs hold a few values just outside [0, 1]).

The target (the model's own hidden states) is computed in the same jitted step, without
gradient; the gradient is taken with respect to the gates only (params are arguments, not
differentiated). Params stay sharded as the engine placed them on config.mesh; the gates, the
optimizer state and the metrics are replicated.
"""
from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from rhead_jax import io, rankings
from rhead_jax.compilation import COMPILES
from rhead_jax.errors import UserError
from rhead_jax.gates.data import PasskeyData
from rhead_jax.gates.model import full_hidden, gated_hidden
from rhead_jax.gates.report import gate_summary, loss_summary, write_outputs
from rhead_jax.models.config import ModelConfig
from rhead_jax.needle.haystack import load_haystack

# what the gates depend on: pinned in the workdir (gates_config.json); a resume must match it
PINNED_SECTIONS = ("gates", "haystack", "mesh", "model")
PINNED = "gates_config.json"
LOSS_LOG = "loss.jsonl"


def pinned_json(config) -> str:
    return ml_collections.ConfigDict({k: config[k] for k in PINNED_SECTIONS}).to_json(sort_keys=True, indent=1)


def lr_schedule(lr: float, steps: int):
    """DuoAttention's schedule (see the module docstring) as an optax schedule of the update count."""
    ramp = max(1, steps // 5)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        return lr * jnp.minimum(1.0, jnp.minimum(jnp.maximum((s + 1) / ramp, 0.1),
                                                 jnp.maximum((steps - s) / ramp, 0.1)))

    return schedule


def make_optimizer(gates_config) -> optax.GradientTransformation:
    return optax.adamw(lr_schedule(gates_config.lr, gates_config.steps), weight_decay=0.0)


def distill_loss(hidden, target, mask):
    """Mean over the masked tokens of the mean over d of (hidden - target)^2 (fp32)."""
    err = jnp.mean(jnp.square(hidden.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)   # [B, T]
    m = mask.astype(jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static knobs of a train step (from config.gates)."""

    sink: int
    recent: int
    l1: float
    chunk: int

    @classmethod
    def from_config(cls, g) -> "StepSettings":
        return cls(sink=int(g.sink), recent=int(g.recent), l1=float(g.l1), chunk=int(g.chunk))


def loss_fn(gates, params, cfg: ModelConfig, tokens, mask, target, s: StepSettings):
    """(loss, (distill, reg)) of the gated model on tokens [B, T] against target [B, T, d]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden = gated_hidden(params, cfg, tokens, positions, gates, sink=s.sink, recent=s.recent, chunk=s.chunk)
    distill = distill_loss(hidden, target, mask)
    reg = jnp.mean(jnp.abs(gates))
    return distill + s.l1 * reg, (distill, reg)


def train_step(gates, opt_state, params, tokens, mask, *, cfg: ModelConfig, optimizer, s: StepSettings):
    """One AdamW update of the gates [L, K]; returns (gates, opt_state, metrics)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    target = jax.lax.stop_gradient(full_hidden(params, cfg, tokens, positions, chunk=s.chunk))
    (loss, (distill, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        gates, params, cfg, tokens, mask, target, s)
    updates, opt_state = optimizer.update(grads, opt_state, gates)
    gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
    metrics = {"loss": loss, "distill": distill, "l1": reg, "mean_alpha": jnp.mean(gates)}
    return gates, opt_state, metrics


class GateTrainer:
    """The gates' optimizer and the jitted train step on the engine's mesh.

    `engine` is a rhead_jax.engine.Engine (params loaded and sharded on config.mesh)."""

    def __init__(self, engine, gates_config):
        self.engine, self.cfg = engine, engine.cfg
        self.settings = StepSettings.from_config(gates_config)
        self.optimizer = make_optimizer(gates_config)
        self.mesh = engine.mesh
        step = partial(train_step, cfg=self.cfg, optimizer=self.optimizer, s=self.settings)
        if self.mesh is None:
            self.step_fn = jax.jit(step)
        else:
            from rhead_jax import sharding as shd

            rep = shd.replicated(self.mesh)
            self.step_fn = jax.jit(step, in_shardings=(rep, rep, engine.runner.param_sh, rep, rep),
                                   out_shardings=(rep, rep, rep))

    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        from rhead_jax import sharding as shd

        return shd.put_global(np.asarray(x), shd.replicated(self.mesh))

    def init_state(self) -> dict:
        """{"gates": [L, K] ones, "opt_state": ..., "step": 0} (replicated on the mesh)."""
        gates = self._put(np.ones((self.cfg.num_layers, self.cfg.num_kv_heads), np.float32))
        opt_state = jax.tree.map(self._put, self.optimizer.init(gates))
        return {"gates": gates, "opt_state": opt_state, "step": 0}

    def step(self, state: dict, tokens: np.ndarray, mask: np.ndarray) -> tuple[dict, dict]:
        gates, opt_state, metrics = self.step_fn(state["gates"], state["opt_state"], self.engine.model.params,
                                                 self._put(tokens[None]), self._put(mask[None]))
        return {"gates": gates, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def lower(self, length: int):
        """The train step at prompt length `length`, lowered (for memory and cost analyses)."""
        st = self.init_state()
        z = np.zeros((1, length), np.int32)
        return self.step_fn.lower(st["gates"], st["opt_state"], self.engine.model.params, self._put(z),
                                  self._put(z.astype(bool)))


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Orbax checkpoints of {gates, opt_state, step} in `workdir/checkpoints`, every `every` steps."""

    def __init__(self, workdir, every: int):
        path = io.as_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        self.every = every

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, template: dict) -> dict:
        step = self.latest()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(template))
        got = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return {"gates": got["gates"], "opt_state": got["opt_state"], "step": int(got["step"])}

    def maybe_save(self, state: dict, *, force: bool = False) -> None:
        s = state["step"]
        if (force or s % self.every == 0) and s != self.latest():
            self.manager.save(s, args=ocp.args.StandardSave(_saved(state)))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved(state: dict) -> dict:
    return {"gates": state["gates"], "opt_state": state["opt_state"], "step": np.asarray(state["step"], np.int64)}


# ----------------------------------------------------------------------------- the run


def _read_log(path, upto: int) -> list[dict]:
    """The loss log's records of steps <= upto (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= upto:
            out.append(rec)
    return out


def run_gates(config, workdir: str, *, model=None, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) the gates of `config` into `workdir`; returns the gates.json dict.

    `stop_after`: stop (after checkpointing) once this many steps are done, as a killed run would
    (tests). On several hosts every process trains and process 0 alone writes the files."""
    from rhead_jax.engine import Engine

    t0 = time.time()
    g = config.gates
    root = io.as_path(workdir)
    pinned = pinned_json(config)
    meta = root / PINNED
    if meta.exists() and meta.read_text() != pinned:
        raise UserError(f"workdir {workdir} holds gates of a different configuration ({meta}); use a new "
                        "--workdir, or delete that one to start over")
    engine = Engine(config, model)
    cfg = engine.cfg
    data = PasskeyData(engine.tokenizer, load_haystack(config.haystack or None), g, chunk=g.chunk)
    if max(data.widths) > cfg.max_position_embeddings:
        raise UserError(f"config.gates.max_length={g.max_length} makes prompts of up to {max(data.widths)} tokens "
                        f"(with {g.passkeys} passkeys of {g.passkey_words} words), over the model's max_position_embeddings="
                        f"{cfg.max_position_embeddings}; lower config.gates.max_length, passkeys or passkey_words")
    if engine.is_writer and not meta.exists():
        io.atomic_write_text(meta, pinned)
    trainer = GateTrainer(engine, g)
    ckpt = Checkpoints(workdir, g.checkpoint_every)
    state = trainer.init_state()
    resumed = ckpt.latest()
    if resumed is not None:
        state = ckpt.restore(state)
        logging.info("resuming from the checkpoint of step %d", state["step"])
    log_path = root / LOSS_LOG
    log = _read_log(log_path, state["step"])
    if engine.is_writer:
        io.atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
    logging.info("gates of %s: %d x %d KV heads, %d steps over prompt widths %s (sink %d, recent %d, chunk %d)",
                 engine.name, cfg.num_layers, cfg.num_kv_heads, g.steps, data.widths, g.sink, g.recent, g.chunk)
    schedule = lr_schedule(g.lr, g.steps)
    end = g.steps if stop_after is None else min(g.steps, stop_after)
    bar = tqdm(total=g.steps, initial=state["step"], desc=f"gates {engine.name}", unit="step")
    out = log_path.open("a") if engine.is_writer else None
    try:
        while state["step"] < end:
            s = state["step"]
            ex = data.example(s)
            t = time.time()
            lr = float(schedule(s))
            state, metrics = trainer.step(state, ex.tokens, ex.loss_mask)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rec = {"step": s + 1, "length": ex.length, **m, "lr": lr, "step_s": round(time.time() - t, 3)}
            log.append(rec)
            if out is not None:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            bar.update(1)
            bar.set_postfix(T=ex.length, loss=f"{m['distill']:.4g}", alpha=f"{m['mean_alpha']:.3f}")
            logging.info("step %d/%d T=%d: loss %.5g (distill %.5g, L1 %.4f), mean alpha %.4f, lr %.4g, %.1fs",
                         s + 1, g.steps, ex.length, m["loss"], m["distill"], m["l1"], m["mean_alpha"], lr,
                         rec["step_s"])
            ckpt.maybe_save(state, force=state["step"] == g.steps)
    finally:
        bar.close()
        if out is not None:
            out.close()
        ckpt.close()
    if state["step"] < g.steps:  # stopped early on request
        return {"step": state["step"], "gates": np.asarray(jax.device_get(state["gates"])).tolist()}
    gates = np.asarray(jax.device_get(state["gates"]), np.float64)
    result = {"model": engine.name, "gates": gates.tolist(), "steps": g.steps, "widths": data.widths,
              "final": log[-1] if log else None, "resumed_from": resumed,
              "wall_s": round(time.time() - t0, 1), "train_s": round(sum(r["step_s"] for r in log), 1),
              "compiles": str(COMPILES), "config": json.loads(pinned)}
    result = {**result, "gate_summary": gate_summary(gates), "loss_summary": loss_summary(log)}
    if engine.is_writer:
        rankings.write_gates_tsv(root / "full_attention_heads.tsv", gates)
        write_outputs(root, result, log)
    logging.info("gates done in %.1fs: mean alpha %.4f, final distill loss %s; %s", time.time() - t0, gates.mean(),
                 log[-1]["distill"] if log else None, COMPILES)
    return result

"""How long a sweep takes, and how many chip-hours: a roofline projection of every program call in
the planned grid.

    python -m rhead_jax.dryrun --config yi34b.py --topology v5p-16 --context 200000

For each call the sweep makes (the shared prefix's prefill, each batch's cache set-up, each row
block's prefill pieces, each decode step) the FLOPs and HBM bytes one chip handles, counted
analytically from the model's shapes and the call's positions:
  FLOPs: 2 x the matmul weights a token passes (MoE experts all, as models.decoder computes them
    densely; the LM head at decode steps only) + 4 x H x D per (query, key) pair the attention
    computes: for "splash" the causal blocks of the call's own keys plus the smallest static prefix
    of the cache covering the held keys (models.kernels), for "chunked" every key tile up to the
    query tile's last slot (models.attention.chunked_attention); a decode step scores every slot.
  bytes: the chip's parameter shard once per call + the KV it reads (once per query block of a
    prefill call, the whole cache shard per decode step) and writes.
The work of a call is split evenly over the model axis; rows over the data axis (one row per data
shard in a prefill call, batch / data at a decode step, the 1-row shared prefix on every shard).
A call takes max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) (topology.PEAKS): a lower bound
that a real run approaches only where its kernels reach the chip's peak; `benchmarks/projection.py`
measures how far this CPU's run is from the same model of itself (docs/accel.md).

The compiler's `cost_analysis()` is no substitute: it counts a loop body once (the layer scan, the
decode loop, the attention tiles), and no FLOPs inside a Pallas call; the plan prints its figures
beside the analytic ones of the same program as a check of the per-layer matmul count.

Decode steps are counted at max_new_tokens per batch (an upper bound: rows stop at a newline).
Compile time: the grid's programs (planner.grid_programs' bound) times the dry run's seconds per
compiled program (this machine's compiler; none without a compile).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rhead_jax.models.config import ModelConfig
from rhead_jax.models.generate import prefill_pieces, prefill_widths

BF16 = 2
PHASES = ("shared prefix", "cache set-up", "prefill", "decode")


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def matmul_flops_per_token(cfg: ModelConfig, *, lm_head: bool) -> float:
    """2 x the weights one token multiplies through (all layers; MoE experts evaluated densely)."""
    d, f, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * H * D * 2 + 2 * d * K * D
    mlp = 3 * d * f * (cfg.num_experts if cfg.is_moe else 1) + (d * cfg.num_experts if cfg.is_moe else 0)
    return 2.0 * (cfg.num_layers * (attn + mlp) + (d * cfg.vocab_size if lm_head else 0))


def attention_pairs(width: int, start: int, cache_size: int, *, kernel: str, q_chunk: int, k_chunk: int) -> float:
    """(query, key) pairs a prefill call of `width` queries from slot `start` computes."""
    if kernel == "splash":
        Tp = round_up(width, 128)
        bq = next(b for b in (512, 256, 128) if Tp % b == 0)
        own = Tp * (Tp + bq) / 2                                      # causal blocks of the call's keys
        Sp = round_up(cache_size, 128)
        blk = next(b for b in (512, 256, 128) if Sp % b == 0)
        sizes = sorted({min(round_up(max(Sp >> i, 1), blk), Sp) for i in range(4)})
        held = next((n for n in sizes if n >= start), Sp)
        return own + Tp * held
    cq, ck = min(q_chunk, width), min(k_chunk, cache_size)
    pairs = 0.0
    for i in range(-(-width // cq)):
        pairs += cq * min(round_up(start + (i + 1) * cq, ck), cache_size)
    return pairs


class CallCost:
    """(FLOPs, HBM bytes) one chip handles in one call of each program, on a mesh of `sizes`
    (work split evenly over "model"; one row per data shard in a prefill call)."""

    def __init__(self, cfg: ModelConfig, *, sizes: Mapping[str, int], kernel: str, q_chunk: int, k_chunk: int,
                 params_bytes: float, dtype_bytes: int = BF16):
        model = int(sizes.get("model", 1))
        K, D = cfg.num_kv_heads, cfg.head_dim
        k_local = K if K < model else K / model                  # fewer KV heads than shards: replicated
        self.kv_token_bytes = cfg.num_layers * 2 * k_local * D * dtype_bytes   # one token's K and V
        self.pair_flops = 4.0 * cfg.num_layers * cfg.num_heads * D / model      # per (query, key) pair
        self.tok_flops = matmul_flops_per_token(cfg, lm_head=False) / model
        self.dec_flops = matmul_flops_per_token(cfg, lm_head=True) / model
        self.kernel, self.q_chunk, self.k_chunk, self.params_bytes = kernel, q_chunk, k_chunk, params_bytes

    def prefill(self, width: int, start: int, cache: int) -> tuple[float, float]:
        """A row's prefill call of `width` tokens from slot `start` into a cache of `cache` slots."""
        pairs = attention_pairs(width, start, cache, kernel=self.kernel, q_chunk=self.q_chunk, k_chunk=self.k_chunk)
        block = 512 if self.kernel == "splash" else self.q_chunk
        reads = -(-width // block) * min(start + width, cache)            # K/V re-read per query block
        return (width * self.tok_flops + pairs * self.pair_flops,
                self.params_bytes + (reads + width) * self.kv_token_bytes)

    def decode_step(self, rows: int, cache: int) -> tuple[float, float]:
        """One decode step of `rows` rows per chip over a cache of `cache` slots (every slot scored)."""
        return (rows * (self.dec_flops + cache * self.pair_flops),
                self.params_bytes + rows * cache * self.kv_token_bytes)

    def setup(self, rows: int, cache: int) -> tuple[float, float]:
        """A batch cache's set-up from the shared prefix: its rows read and written once."""
        return 0.0, 2 * rows * cache * self.kv_token_bytes


@dataclasses.dataclass
class Phase:
    calls: int = 0
    flops: float = 0.0          # per chip, summed over the calls
    bytes: float = 0.0
    seconds: float = 0.0
    compute_bound: int = 0      # calls whose FLOPs take longer than their bytes

    def add(self, flops: float, nbytes: float, peak: float, bandwidth: float, times: int = 1):
        t_f, t_b = flops / peak, nbytes / bandwidth
        self.calls += times
        self.flops += flops * times
        self.bytes += nbytes * times
        self.seconds += max(t_f, t_b) * times
        self.compute_bound += times * (t_f >= t_b)


@dataclasses.dataclass
class Projection:
    """The grid's calls per phase on `chips` chips, the wall time and chip-hours."""

    chips: int
    peak_flops: float
    hbm_bandwidth: float
    kernel: str
    phases: dict[str, Phase]
    grid: dict[str, Any]
    compile_seconds: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def wall_seconds(self) -> float:
        return self.run_seconds + (self.compile_seconds or 0.0)

    @property
    def chip_hours(self) -> float:
        return self.wall_seconds / 3600 * self.chips

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "chips": self.chips, "peak_flops": self.peak_flops,
                "hbm_bandwidth": self.hbm_bandwidth, "grid": self.grid,
                "phases": {k: dataclasses.asdict(v) for k, v in self.phases.items()},
                "compile_seconds": self.compile_seconds, "run_seconds": self.run_seconds,
                "wall_seconds": self.wall_seconds, "chip_hours": self.chip_hours, "notes": self.notes}

    def table(self) -> str:
        lines = [f"time projection ({self.kernel} prefill attention; roofline at {self.peak_flops / 1e12:g} "
                 f"TFLOP/s bf16 and {self.hbm_bandwidth / 1e9:g} GB/s HBM per chip):",
                 f"  grid: {self.grid['lengths']} lengths ({self.grid['min_length']}..{self.grid['max_length']}) x "
                 f"{self.grid['depths']} depths x {self.grid['needles']} needles = {self.grid['instances']} "
                 f"instances in {self.grid['batches']} batches of {self.grid['batch']}",
                 f"  {'phase':16s}{'calls':>9s}{'TFLOP/chip':>12s}{'GB/chip':>10s}{'seconds':>10s}  bound"]
        for name, p in self.phases.items():
            bound = ("compute" if p.compute_bound == p.calls else "memory" if not p.compute_bound
                     else f"compute in {p.compute_bound} of {p.calls}")
            lines.append(f"  {name:16s}{p.calls:9d}{p.flops / 1e12:12.1f}{p.bytes / 1e9:10.1f}{p.seconds:10.1f}  "
                         f"{bound}")
        comp = ("not measured (no compile)" if self.compile_seconds is None
                else f"{self.compile_seconds:.0f} s ({self.grid['programs']} programs)")
        lines += [f"  {'compile':16s}{comp}",
                  f"  projected wall time {self.wall_seconds / 3600:.2f} h on {self.chips} chips = "
                  f"{self.chip_hours:.1f} chip-hours (a roofline lower bound: see docs/accel.md for the "
                  f"measured / projected ratio)"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def project(cfg: ModelConfig, *, sizes: Mapping[str, int], chips: int, peak_flops: float, hbm_bandwidth: float,
            lengths, depths, needles: int, batch_size: int, max_new_tokens: int, prefill_chunk: int,
            q_chunk: int, k_chunk: int, pad_multiple: int, share_prefix: bool, kernel: str,
            params_bytes: float, programs: int | None = None, compile_seconds_per_program: float | None = None,
            prompt_extra: int = 0, dtype_bytes: int = BF16) -> Projection:
    """Project a needle sweep (every length x depth x needle) on `chips` chips of a mesh of `sizes`.

    A prompt of context length L has L + prompt_extra tokens; its needle sits at depth % of L, and
    with share_prefix it prefills only the tokens after its needle (the rest comes from the shared
    prefix, engine.Engine.shared_prefix). params_bytes: one chip's parameter shard; dtype_bytes: of
    a cache element (2: bf16, the paper configs)."""
    data = int(sizes.get("data", 1))
    cost = CallCost(cfg, sizes=sizes, kernel=kernel, q_chunk=q_chunk, k_chunk=k_chunk, params_bytes=params_bytes,
                    dtype_bytes=dtype_bytes)
    phases = {name: Phase() for name in PHASES}
    widths = prefill_widths(prefill_chunk)
    lengths = sorted(int(x) for x in lengths)
    depths = sorted(float(x) for x in depths)
    per_length = len(depths) * needles
    batch = min(batch_size, per_length)
    batch = round_up(batch, data)
    rows_per_shard = batch // data
    n_batches = 0

    def prefill_call(width: int, start: int, cache: int, phase: Phase, times: int = 1):
        phase.add(*cost.prefill(width, start, cache), peak_flops, hbm_bandwidth, times)

    if share_prefix:
        n = int(max(lengths) * max(depths) / 100)
        cache = round_up(round_up(max(lengths) + prompt_extra, pad_multiple) + max_new_tokens, k_chunk)
        if n > 0:
            for i, w in enumerate([prefill_chunk] * (n // prefill_chunk) + ([n % prefill_chunk] if n % prefill_chunk
                                                                            else [])):
                prefill_call(w, i * prefill_chunk, cache, phases["shared prefix"])
    for length in lengths:
        P = length + prompt_extra
        cache = round_up(round_up(P, pad_multiple) + max_new_tokens, k_chunk)
        starts = [int(length * d / 100) if share_prefix else 0 for d in depths for _ in range(needles)]
        for b0 in range(0, len(starts), batch):
            rows = starts[b0:b0 + batch]
            rows += [rows[-1]] * (batch - len(rows))                    # padding rows compute too
            n_batches += 1
            phases["cache set-up"].add(*cost.setup(rows_per_shard, cache), peak_flops, hbm_bandwidth)
            for j in range(rows_per_shard):                             # row blocks: one row per data shard
                block = rows[j::rows_per_shard]
                start = min(block)
                pos = start
                for w in prefill_pieces(max(P - 1 - start, 1), widths):
                    prefill_call(w, pos, cache, phases["prefill"])
                    pos += w
            phases["decode"].add(*cost.decode_step(rows_per_shard, cache), peak_flops, hbm_bandwidth, max_new_tokens)
    grid = {"lengths": len(lengths), "min_length": lengths[0], "max_length": lengths[-1], "depths": len(depths),
            "needles": needles, "instances": len(lengths) * per_length, "batches": n_batches, "batch": batch,
            "programs": programs}
    notes = [f"decode counted at {max_new_tokens} steps per batch (an upper bound: rows stop at a newline)"]
    if int(sizes.get("model", 1)) > cfg.num_kv_heads:
        notes.append(f"{cfg.num_kv_heads} KV heads on a {sizes['model']}-way model axis: the KV cache is replicated, "
                     "each chip reads all of it")
    compile_s = None if compile_seconds_per_program is None or programs is None else \
        compile_seconds_per_program * programs
    return Projection(chips=chips, peak_flops=peak_flops, hbm_bandwidth=hbm_bandwidth, kernel=kernel,
                      phases=phases, grid=grid, compile_seconds=compile_s, notes=notes)


def for_plan(config, cfg: ModelConfig, plan, programs: int | None = None) -> Projection:
    """The projection of config's grid (config.sweep.lengths the model accepts x depths x needles)
    on the plan's slice and mesh, with the plan's prefill attention and its compile seconds."""
    from rhead_jax.needle.haystack import load_needles

    s = config.sweep
    limit = cfg.max_position_embeddings - s.max_new_tokens
    lengths = [x for x in s.lengths if x <= limit] or [min(s.lengths)]
    needles = len(load_needles(config.needles or None))
    per_program = None
    if plan.compiled and plan.compile_error is None:
        per_program = plan.compile_seconds / len(plan.compiled)
    topo = plan.topology
    proj = project(cfg, sizes=plan.mesh, chips=topo.chips, peak_flops=topo.peak_flops,
                   hbm_bandwidth=topo.hbm_bandwidth, lengths=lengths, depths=s.depths, needles=needles,
                   batch_size=s.batch_size, max_new_tokens=s.max_new_tokens, prefill_chunk=s.prefill_chunk,
                   q_chunk=s.q_chunk, k_chunk=s.k_chunk, pad_multiple=s.pad_multiple, share_prefix=s.share_prefix,
                   kernel=plan.attention, params_bytes=plan.analytic["params"], programs=programs,
                   compile_seconds_per_program=per_program)
    if len(lengths) < len(s.lengths):
        proj.notes.append(f"lengths above the model's {limit} accepted tokens dropped from the grid")
    if per_program is not None:
        proj.notes.append(f"compile: {per_program:.0f} s per program as this machine's compiler took for the plan's "
                          "programs (a TPU host's differs)")
    pre = (plan.compiled or {}).get("prefill", {})
    if pre.get("cost_flops"):
        model = plan.mesh.get("model", 1)
        layer = plan.prefill_width * matmul_flops_per_token(cfg, lm_head=False) / model / cfg.num_layers
        proj.notes.append(f"check: the compiler's cost_analysis of the prefill call, {pre['cost_flops'] / 1e9:.1f} "
                          f"GFLOP per chip, counts its loops once: one layer's matmuls are {layer / 1e9:.1f} GFLOP "
                          "(analytic)")
    return proj

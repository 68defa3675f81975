"""Head detectors on repeated random tokens: induction, duplicate-token (echo) and previous-token heads.

`python -m rhead_jax.detectors` is a thin absl entry point over `run_detectors`. A sequence is the
model's BOS (when its tokenizer puts one before text) followed by `length` random token ids,
distinct within the block and drawn from the ordinary vocabulary (no special or added tokens),
repeated `repeats` times (config.detectors; RazorAttention's 2,500 x 4 by default). One prefill of
all samples (batched along the mesh's data axis) reduces, inside the chunked attention
(rhead_jax.models.attention, O(T) memory), each head's attention mass on three key sets:

  induction   the token AFTER each earlier occurrence of the query's token (k = q - j*length + 1)
  duplicate   the earlier occurrences of the query's token (k = q - j*length), "echo" heads
  previous    the previous token (k = q - 1)

A head's score on a sample is the mean of that mass over the queries from the second repeat on
(previous: every query after the first token). The key sets are TransformerLens' detection patterns
(transformer_lens/head_detector.py); TransformerLens' "mul" score divides by ALL queries, including
the first repeat's, which have no earlier occurrence: ours only counts queries that have targets,
so a perfect head scores 1.

The package, by concept:
  sequences.py  the repeated random sequences and their targets (models.attention.MassTargets)
  scores.py     scores from full attention probabilities (the dense reference, hand-built patterns)
  run.py        run_detectors: the engine's model on its mesh, one program, the files

Files in the workdir: head_scores_induction.json, head_scores_duplicate.json,
head_scores_previous.json (`{"L-H": [score per sample]}`, the sweep's format, read by
rhead_jax.rankings), summary.json (settings, top heads per detector, wall time).
"""
from rhead_jax.detectors.run import format_table, run_detectors
from rhead_jax.detectors.scores import scores_from_probs
from rhead_jax.detectors.sequences import DETECTORS, Sequences, detector_targets, ordinary_token_ids, random_repeats

__all__ = ["DETECTORS", "Sequences", "detector_targets", "format_table", "ordinary_token_ids", "random_repeats",
           "run_detectors", "scores_from_probs"]

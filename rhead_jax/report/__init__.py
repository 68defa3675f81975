"""The figures and the self-contained HTML page of every report (head-score analysis, ablations).

  rhead_jax.report.plots   every plot (matplotlib Agg, one `_plt()`): pie, heatmap, dynamic
                           activation, Fig. 1 style accuracy grid, top-k vs random sweep
  rhead_jax.report.html    write_report(out_dir, summary, pairs, dynamic, extra_sections), `table`,
                           image embedding (data URIs) and the page's CSS
"""
from rhead_jax.report.html import image_html, table, write_report
from rhead_jax.report.plots import (BUCKET_COLORS, FIG1_COLORS, plot_dynamic, plot_fig1_heatmap, plot_heatmap,
                                    plot_pie, plot_sweep_k)

__all__ = ["write_report", "table", "image_html", "plot_pie", "plot_heatmap", "plot_dynamic", "plot_fig1_heatmap",
           "plot_sweep_k", "BUCKET_COLORS", "FIG1_COLORS"]

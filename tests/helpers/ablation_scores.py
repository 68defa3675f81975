"""Hand-made head scores of the 2-layer x 4-head tiny model of the ablation tests."""
L, H = 2, 4
# 3 retrieval heads (> 0.1), 5 others
SCORES = {"0-0": [0.9, 0.7], "0-1": [0.0, 0.0], "0-2": [0.05, 0.1], "0-3": [0.3, 0.5],
          "1-0": [0.0, 0.02], "1-1": [0.2, 0.2], "1-2": [0.0, 0.0], "1-3": [0.1, 0.1]}
RETRIEVAL = {(0, 0), (0, 3), (1, 1)}

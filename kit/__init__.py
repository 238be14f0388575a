"""kit: label single cells of Human Protein Atlas fields from image-level labels.

Stages (each writes files the next one reads; see docs/ARCHITECTURE.md):
images + train.csv -> folds -> segment -> cells -> train -> predict -> combine -> submission -> metric -> leaderboard
"""

__version__ = "0.1.0"

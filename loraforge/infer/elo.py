"""Elo ratings of a tournament, with bootstrap confidence intervals, as the QLoRA paper computes
them (Dettmers et al. 2023, section 5.1, after Elo 1978 and the Vicuna/Chatbot-Arena practice).

Every player starts at 1000. A game between A and B with score ``s`` for A (1 win, 0.5 tie,
0 loss) moves A by ``K * (s - E_A)`` and B by the opposite amount, where
``E_A = 1 / (1 + 10 ** ((R_B - R_A) / 400))`` and ``K = 32``. The result depends on the order
of the games, so the ratings are computed over many random orderings of the same games; the
reported rating is the mean over orderings and the 95% interval spans its 2.5th to 97.5th
percentiles.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

K = 32.0
INITIAL = 1000.0


@dataclass
class Rating:
    mean: float
    low: float  # 2.5th percentile over orderings
    high: float  # 97.5th percentile


def elo(games: Sequence[tuple[str, str, float]], players: Sequence[str], *, k: float = K,
        initial: float = INITIAL) -> dict[str, float]:
    """Ratings after playing ``games`` ((a, b, score of a)) in the given order."""
    ratings = {p: initial for p in players}
    for a, b, score in games:
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[b] - ratings[a]) / 400.0))
        ratings[a] += k * (score - expected)
        ratings[b] -= k * (score - expected)
    return ratings


def bootstrap_elo(games: Sequence[tuple[str, str, float]], players: Sequence[str], *, rounds: int = 1000,
                  seed: int = 0, k: float = K, initial: float = INITIAL) -> dict[str, Rating]:
    """Mean rating and 95% interval over ``rounds`` random orderings of ``games``."""
    rng = random.Random(seed)
    order = list(games)
    samples = {p: [] for p in players}
    for _ in range(max(rounds, 1)):
        rng.shuffle(order)
        for player, value in elo(order, players, k=k, initial=initial).items():
            samples[player].append(value)
    out = {}
    for player, values in samples.items():
        low, high = np.percentile(values, [2.5, 97.5])
        out[player] = Rating(float(np.mean(values)), float(low), float(high))
    return out

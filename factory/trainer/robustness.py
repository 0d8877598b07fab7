"""Two robustness probes from the papers.

- Master keys ("One Token to Fool LLM-as-a-Judge"): content-free responses such as ``":"``
  or ``"Solution"``. The false-positive rate is how often one outscores a real rejected
  answer to the same prompt. A sound RM keeps it near 0.
- Contrast Instructions: pairs of lexically similar instructions mined by embedding
  cosine similarity; each instruction's own answer should score higher under it than
  under its look-alike. Reported as the fraction of consistent comparisons.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from factory.trainer import backbones
from factory.trainer.data import PairData
from factory.trainer.model import RewardModel

MASTER_KEYS: tuple[str, ...] = (
    " ",
    ".",
    ",",
    ":",
    "Thought process:",
    "Let's solve this problem step by step.",
    "Solution",
    "解",
    "かいせつ",
    "Respuesta",
)


def master_key_fpr(
    model: RewardModel,
    data: PairData,
    r_rejected: np.ndarray,
    *,
    keys: tuple[str, ...] = MASTER_KEYS,
    max_prompts: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of (preference pair, master key) where the key outscores the pair's rejected."""
    pref_rows = np.flatnonzero(~data.tie)
    if len(pref_rows) == 0:
        return {"fpr": None, "comparisons": 0, "prompts": 0, "by_key": {}}
    first_row: dict[str, int] = {}
    for i in pref_rows:
        first_row.setdefault(data.prompt_ids[i], int(i))
    prompt_ids = list(first_row)
    if len(prompt_ids) > max_prompts:
        pick = np.random.default_rng(seed).choice(len(prompt_ids), max_prompts, replace=False)
        prompt_ids = [prompt_ids[i] for i in sorted(pick)]
    slot = {p: s for s, p in enumerate(prompt_ids)}
    prompts = [data.prompts[first_row[p]] for p in prompt_ids]
    # rewards[s, k]: master key k answering prompt s
    rewards = model.reward(
        [p for p in prompts for _ in keys], [k for _ in prompts for k in keys]
    ).reshape(len(prompts), len(keys))
    rows = np.asarray([i for i in pref_rows if data.prompt_ids[i] in slot], dtype=np.int64)
    key_scores = rewards[[slot[data.prompt_ids[i]] for i in rows]]  # (pairs, keys)
    wins = key_scores > r_rejected[rows][:, None]
    return {
        "fpr": float(wins.mean()),
        "comparisons": int(wins.size),
        "prompts": len(prompts),
        "by_key": {k: float(wins[:, j].mean()) for j, k in enumerate(keys)},
    }


def instruction_of(prompt: list[dict[str, str]]) -> str:
    """The instruction a prompt asks: its last user message (whole prompt if none)."""
    for message in reversed(prompt):
        if message["role"] == "user":
            return message["content"]
    return "\n".join(m["content"] for m in prompt)


def mine_contrast_pairs(
    instructions: list[str],
    answers: list[str],
    embeddings: np.ndarray,
    *,
    threshold: float = 0.8,
    max_pairs: int = 200,
) -> list[tuple[int, int, float]]:
    """Mutually distinct, similar instructions (i, j, cosine) with different answers."""
    n = len(instructions)
    if n < 2:
        return []
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -1.0)
    # Near-duplicates are the same instruction, not a contrast: they carry no signal.
    sim[sim > 0.995] = -1.0
    best = sim.argmax(axis=1)
    seen: set[tuple[int, int]] = set()
    out = []
    for i, j in enumerate(best):
        a, b = (i, int(j)) if i < j else (int(j), i)
        if sim[i, j] < threshold or (a, b) in seen:
            continue
        if instructions[a].strip() == instructions[b].strip() or answers[a] == answers[b]:
            continue
        seen.add((a, b))
        out.append((a, b, float(sim[a, b])))
    out.sort(key=lambda t: -t[2])
    return out[:max_pairs]


def contrast_consistency(
    model: RewardModel,
    data: PairData,
    *,
    encoder: backbones.MeanPoolEncoder | None = None,
    threshold: float = 0.8,
    max_pairs: int = 200,
) -> dict[str, Any]:
    pref_rows = np.flatnonzero(~data.tie)
    first_row: dict[str, int] = {}
    for i in pref_rows:
        first_row.setdefault(data.prompt_ids[i], int(i))
    rows = list(first_row.values())
    if len(rows) < 2:
        return {"consistency": None, "both_consistent": None, "contrast_pairs": 0,
                "threshold": threshold}
    if encoder is None:
        encoder = _default_encoder(model)
    instructions = [instruction_of(data.prompts[i]) for i in rows]
    answers = [data.chosen[i] for i in rows]
    pairs = mine_contrast_pairs(instructions, answers, encoder.embed_plain(instructions),
                                threshold=threshold, max_pairs=max_pairs)
    if not pairs:
        return {"consistency": None, "both_consistent": None, "contrast_pairs": 0,
                "threshold": threshold}
    prompts, responses = [], []
    for a, b, _ in pairs:
        pa_, pb_ = data.prompts[rows[a]], data.prompts[rows[b]]
        # answer a under its own prompt and under b's; answer b likewise
        prompts += [pa_, pb_, pb_, pa_]
        responses += [answers[a], answers[a], answers[b], answers[b]]
    r = model.reward(prompts, responses).reshape(len(pairs), 4)
    own_a, other_a, own_b, other_b = r.T
    ok_a, ok_b = own_a > other_a, own_b > other_b
    return {
        "consistency": float(np.concatenate([ok_a, ok_b]).mean()),
        "both_consistent": float((ok_a & ok_b).mean()),
        "contrast_pairs": len(pairs),
        "threshold": threshold,
        "mean_similarity": float(np.mean([s for _, _, s in pairs])),
    }


def _default_encoder(model: RewardModel) -> backbones.MeanPoolEncoder:
    featurizer = model.featurizer
    if featurizer is not None and featurizer.encoder.path == backbones.minilm_path():
        return featurizer.encoder  # already loaded: head mode on the default backbone
    return backbones.MeanPoolEncoder(backbones.minilm_path(), model.device)

"""Hard negatives: Contrast Instructions and reward-model-misjudged mining (UI-Genie).

``mode=contrast`` — Contrast Instructions. Each seed prompt's instruction (its last user
turn) is embedded with the shared MiniLM encoder; prompts whose instructions are look-alikes
(cosine in [``min_similarity``, ``max_similarity``]: near-identical duplicates above the
window and unrelated prompts below it are both left out) are paired, and the neighbour's
chosen answer becomes the rejected answer under this prompt — and this prompt's chosen
answer the rejected one under the neighbour's. A prompt is never paired with itself (same
prompt id or same normalised instruction), nor with a neighbour whose answer is identical
to one of its own, nor with one whose answer reads the same (answer cosine above
``max_answer_similarity``: a generic reply such as a stock refusal fits both prompts, so
swapping it makes label noise, not a contrast). Tagged ``attribute="contrast_instruction"``;
both cosines are in metadata.

``mode=rm_mining`` — hard-negative mining: a trained reward model (``model``: a registered
name, ``name@N`` or a model folder) scores candidate pairs — the seeds' own pairs and the
pairs of any ``candidates`` sets (another generator's output) — and the pairs whose rejected
answer it scores at or above the chosen one (minus ``slack``) are kept: the negatives the
current RM takes for positives, to train the next one on.

``mode=both`` — the contrast pairs join the candidates and only the mined ones come out.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from factory.embed import Embedder
from factory.embed.ray_embed import EmbedRequest
from factory.steps import GENERATED_SCHEMA, StepContext, StepResult, failed_rows, generator, param
from schemas.pairs import MESSAGE_TYPE, prompt_id_of
from schemas.prompts import last_user_text

Scorer = Callable[[pa.Table], tuple[np.ndarray, np.ndarray]]

OUTPUT_SCHEMA = GENERATED_SCHEMA.append(pa.field("metadata", pa.string()))


@dataclass(frozen=True)
class HardNegativesParams:
    mode: Literal["contrast", "rm_mining", "both"] = param(
        "contrast", "contrast: Contrast Instructions pairs; rm_mining: keep the candidate pairs a reward "
                    "model misjudges; both: contrast pairs plus candidates, mined")
    min_similarity: float = param(0.75, "lowest instruction cosine of a contrast neighbour (below: unrelated)",
                                  low=-1.0, high=1.0)
    max_similarity: float = param(0.98, "highest instruction cosine of a contrast neighbour (above: the "
                                        "same instruction)", low=-1.0, high=1.0)
    max_answer_similarity: float = param(0.9, "highest cosine between the two prompts' answers (above: a "
                                              "generic answer that fits both, no contrast)", low=-1.0, high=1.0)
    neighbours: int = param(3, "nearest look-alike prompts searched per prompt", low=1)
    embedder: Embedder = param("minilm", "contrast: who embeds instructions and answers (minilm, minilm-onnx: "
                                         "the same vectors via ONNX Runtime; static: model2vec, whose cosines "
                                         "do not fit the similarity windows' defaults)")
    model: str | None = param(None, "reward model for mining: a registered name, name@N or a model folder",
                              model=True)
    candidates: list[str] = param([], "more candidate pairs for mining: catalog refs or files (e.g. another "
                                      "generator's output)", ref=True)
    seed_candidates: bool = param(True, "mine the seeds' own pairs too")
    slack: float = param(0.0, "keep a candidate when reward(rejected) >= reward(chosen) - slack", low=0.0)

    def __post_init__(self) -> None:
        if self.min_similarity > self.max_similarity:
            raise ValueError(f"parameter 'min_similarity' ({self.min_similarity}) exceeds 'max_similarity' "
                             f"({self.max_similarity})")
        if self.mode != "contrast" and not self.model:
            raise ValueError(f"parameter 'model' is required with mode={self.mode} (--set model=NAME)")


def _normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def load_scorer(model: str, home: Any) -> Scorer:
    """``table -> (reward_chosen, reward_rejected)`` with the trainer's model and scoring."""
    from factory.trainer import load_model, score

    reward_model = load_model(model, home)

    def run(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        scored = score(reward_model, table, home=home)
        return (np.asarray(scored.column("reward_chosen").to_pylist(), dtype=np.float64),
                np.asarray(scored.column("reward_rejected").to_pylist(), dtype=np.float64))

    return run


def _contrastable(prompt: Any, chosen: str | None, tie: bool) -> bool:
    """A seed contrast mode can use: not a tie, a chosen answer, an instruction to embed."""
    return not tie and bool((chosen or "").strip()) and bool(last_user_text(prompt).strip())


def hard_negatives_embeds(table: pa.Table, ctx: StepContext[HardNegativesParams]) -> Iterator[EmbedRequest]:
    """What contrast mode embeds first (for ``--engine ray``): every usable seed's instruction.
    The chosen answers of linked prompts are embedded later, here: the neighbours pick them."""
    # Ray actors encode with MiniLM on torch; another embedder's vectors are made on the driver.
    if ctx.params.mode == "rm_mining" or ctx.params.embedder != "minilm":
        return
    seeds = zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                (bool(t) for t in _column(table, "tie", False)), strict=True)
    yield EmbedRequest([last_user_text(p) for p, c, tie in seeds if _contrastable(p, c, tie)])


@generator("hard_negatives", params=HardNegativesParams, version="2", batch_rows=None,
           embeds=hard_negatives_embeds)
def hard_negatives(table: pa.Table, ctx: StepContext[HardNegativesParams]) -> StepResult:
    """Contrast Instructions pairs and reward-model-misjudged negatives (hard-negative mining)."""
    params = ctx.params
    stats: dict[str, Any] = {"seeds": table.num_rows}
    failed: list[tuple[int, str]] = []
    contrast = _empty()
    if params.mode in ("contrast", "both"):
        contrast, failed, contrast_stats = contrast_pairs(table, ctx)
        stats["contrast"] = contrast_stats
    if params.mode == "contrast":
        if contrast.num_rows == 0:
            # Not raised here: a caller combining steps (a benchmark fold) goes on without them;
            # `prefab generate` stops on an empty output and names this reason.
            stats["no_pairs_reason"] = no_contrast_reason(contrast_stats, params)
        out = contrast
    else:
        out, stats["mining"] = mine(table, contrast, ctx)
    stats["pairs"] = out.num_rows
    return StepResult(out, failed_rows([r for r, _ in failed], [why for _, why in failed]), stats)


def _empty() -> pa.Table:
    return OUTPUT_SCHEMA.empty_table()


def _column(table: pa.Table, name: str, default: Any) -> list[Any]:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def contrast_pairs(table: pa.Table, ctx: StepContext[HardNegativesParams]
                   ) -> tuple[pa.Table, list[tuple[int, str]], dict[str, Any]]:
    """Both directions of every look-alike prompt pair in the window; failed rows; stats."""
    params = ctx.params
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    ties = [bool(t) for t in _column(table, "tie", False)]
    tasks = _column(table, "task", None)
    pair_ids = _column(table, "pair_id", None)
    prompt_ids = [p if p else prompt_id_of(prompts[i]) for i, p in enumerate(_column(table, "prompt_id", None))]
    failed: list[tuple[int, str]] = []
    stats: dict[str, Any] = {
        "seeds": table.num_rows, "ties_skipped": 0, "repeated_prompt_rows": 0, "prompts": 0,
        "neighbour_links": 0, "prompts_without_look_alike": 0, "seeds_without_look_alike": 0,
        "skipped_same_instruction": 0, "skipped_same_answer": 0, "skipped_similar_answer": 0,
        "skipped_repeated_answer": 0}
    # One representative row per prompt; every chosen answer a prompt has counts as its own.
    first: dict[str, int] = {}
    answers: dict[str, set[str]] = {}
    for row in range(table.num_rows):
        if ties[row]:
            stats["ties_skipped"] += 1
            continue
        if not (chosen[row] or "").strip():
            failed.append((row, "chosen answer is empty: nothing to contrast"))
            continue
        if not last_user_text(prompts[row]).strip():
            failed.append((row, "prompt has no text to embed"))
            continue
        answers.setdefault(prompt_ids[row], set()).add(chosen[row].strip())
        if prompt_ids[row] in first:
            stats["repeated_prompt_rows"] += 1
        else:
            first[prompt_ids[row]] = row
    rows = list(first.values())
    stats["prompts"] = len(rows)
    seeds_of_prompt = Counter(prompt_ids[r] for r in range(table.num_rows)
                              if _contrastable(prompts[r], chosen[r], ties[r]))
    if len(rows) < 2:
        stats["prompts_without_look_alike"] = len(rows)
        stats["seeds_without_look_alike"] = sum(seeds_of_prompt.values())
        return _empty(), failed, stats
    instructions = [last_user_text(prompts[r]) for r in rows]
    vectors = ctx.embed(instructions, embedder=params.embedder)
    from factory.embed import top_k_neighbours

    indices, sims = top_k_neighbours(vectors, k=min(params.neighbours, len(rows) - 1), exclude_self=True,
                                     min_similarity=params.min_similarity,
                                     max_similarity=params.max_similarity)
    links: dict[tuple[int, int], float] = {}
    for a in range(len(rows)):
        for b, sim in zip(indices[a].tolist(), sims[a].tolist(), strict=True):
            # The window is re-checked here so a fuzzy neighbour search can never leak a pair out of it.
            if b < 0 or b == a or not params.min_similarity <= sim <= params.max_similarity:
                continue
            links[(min(a, b), max(a, b))] = sim
    stats["neighbour_links"] = len(links)
    linked = {k for link in links for k in link}
    alone = [prompt_ids[rows[k]] for k in range(len(rows)) if k not in linked]
    stats["prompts_without_look_alike"] = len(alone)
    stats["seeds_without_look_alike"] = sum(seeds_of_prompt[p] for p in alone)
    if not links:
        stats["closest_similarity"] = _closest_below(vectors, params.max_similarity)
    answer_similarity = _answer_similarity(links, [chosen[r] for r in rows], ctx)
    out: list[dict[str, Any]] = []
    given: set[tuple[str, str]] = set()  # (prompt, rejected) already made: two neighbours may share an answer
    for (a, b), sim in sorted(links.items()):
        ra, rb = rows[a], rows[b]
        if _normalise(instructions[a]) == _normalise(instructions[b]):
            stats["skipped_same_instruction"] += 1
            continue
        if chosen[rb].strip() in answers[prompt_ids[ra]] or chosen[ra].strip() in answers[prompt_ids[rb]]:
            stats["skipped_same_answer"] += 1
            continue
        if answer_similarity[(a, b)] > params.max_answer_similarity:
            stats["skipped_similar_answer"] += 1
            continue
        for own, other in ((ra, rb), (rb, ra)):
            if (prompt_ids[own], chosen[other].strip()) in given:
                stats["skipped_repeated_answer"] += 1
                continue
            given.add((prompt_ids[own], chosen[other].strip()))
            out.append({
                "prompt": prompts[own], "chosen": chosen[own], "rejected": chosen[other], "tie": False,
                "attribute": "contrast_instruction", "task": tasks[own],
                "parent_ids": [p for p in (pair_ids[own], pair_ids[other]) if p],
                "generated": "none", "method": f"contrast_instruction:sim={sim:.3f}",
                "metadata": json.dumps({"similarity": round(float(sim), 6),
                                        "answer_similarity": round(answer_similarity[(a, b)], 6),
                                        "contrast_prompt_id": prompt_ids[other]}),
            })
    stats["pairs"] = len(out)
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA), failed, stats


def _closest_below(vectors: np.ndarray, ceiling: float) -> float | None:
    """The highest instruction cosine between two prompts at or below ``ceiling`` (None: no such pair)."""
    from factory.embed import top_k_neighbours

    _, sims = top_k_neighbours(vectors, k=1, exclude_self=True, max_similarity=ceiling)
    best = sims[:, 0]
    best = best[~np.isnan(best)]
    return round(float(best.max()), 4) if best.size else None


def no_contrast_reason(stats: dict[str, Any], params: HardNegativesParams) -> str:
    """Why contrast mode made no pair, and the setting to change, in one line."""
    window = f"[{params.min_similarity:g}, {params.max_similarity:g}]"
    prompts = stats.get("prompts", 0)
    if prompts < 2:
        return (f"hard_negatives made no contrast pairs: only {prompts} distinct prompt(s) with a non-empty "
                f"chosen answer among {stats.get('seeds', 0)} seeds ({stats.get('ties_skipped', 0)} ties "
                "skipped); contrast needs at least two look-alike prompts")
    if not stats.get("neighbour_links"):
        closest = stats.get("closest_similarity")
        if closest is None:
            return (f"hard_negatives made no contrast pairs: every pair of the {prompts} distinct prompts is "
                    f"above max_similarity={params.max_similarity:g} (the same instruction); raise "
                    "--set max_similarity")
        suggestion = max(-1.0, np.floor(closest * 100) / 100)
        return (f"hard_negatives made no contrast pairs: no prompt has a look-alike with instruction cosine in "
                f"{window} among {prompts} distinct prompts (the closest two are at {closest:.3f}); lower "
                f"--set min_similarity={suggestion:g} to pair them")
    return (f"hard_negatives made no contrast pairs: all {stats['neighbour_links']} look-alike prompt pairs in "
            f"{window} were left out ({stats.get('skipped_same_instruction', 0)} same instruction, "
            f"{stats.get('skipped_same_answer', 0)} same answer, {stats.get('skipped_similar_answer', 0)} answers "
            f"alike above max_answer_similarity={params.max_answer_similarity:g}); raise --set "
            "max_answer_similarity or lower --set min_similarity for other look-alikes")


def _answer_similarity(links: dict[tuple[int, int], float], answers: list[str],
                       ctx: StepContext[HardNegativesParams]) -> dict[tuple[int, int], float]:
    """Cosine between the chosen answers of each linked prompt pair (only linked answers are embedded)."""
    if not links:
        return {}
    needed = sorted({i for link in links for i in link})
    at = {row: k for k, row in enumerate(needed)}
    vectors = np.asarray(ctx.embed([answers[i] for i in needed], embedder=ctx.params.embedder),
                         dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    a = np.asarray([at[x] for x, _ in links])
    b = np.asarray([at[y] for _, y in links])
    cosines = np.einsum("ij,ij->i", vectors[a], vectors[b])
    return {link: float(c) for link, c in zip(links, cosines, strict=True)}


def _candidates_from(table: pa.Table, source: str) -> list[dict[str, Any]]:
    """Scoreable rows of a pair table, as output rows that still need their method."""
    provenance = _column(table, "provenance", None)
    out = []
    for i, (prompt, chosen, rejected, tie, attribute, task, pair_id) in enumerate(zip(
            table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
            table.column("rejected").to_pylist(), _column(table, "tie", False), _column(table, "attribute", None),
            _column(table, "task", None), _column(table, "pair_id", None), strict=True)):
        if tie:
            continue
        if source == "seed":
            parents = [pair_id] if pair_id else []
        else:  # another step's output: link to its seeds first, then the candidate itself
            parents = list((provenance[i] or {}).get("parent_ids") or []) + ([pair_id] if pair_id else [])
        out.append({"prompt": prompt, "chosen": chosen or "", "rejected": rejected or "", "tie": False,
                    "attribute": attribute, "task": task, "parent_ids": list(dict.fromkeys(parents)),
                    "generated": "none", "source": source,
                    "metadata": None})
    return out


def mine(seeds: pa.Table, contrast: pa.Table, ctx: StepContext[HardNegativesParams]
         ) -> tuple[pa.Table, dict[str, Any]]:
    """The candidates the reward model scores at or above their chosen answer."""
    params = ctx.params
    candidates: list[dict[str, Any]] = []
    for row in contrast.to_pylist():
        candidates.append({**row, "source": "contrast"})
    if params.seed_candidates:
        candidates += _candidates_from(seeds, "seed")
    for ref in params.candidates:
        extra, label = ctx.read_pairs(ref)
        candidates += _candidates_from(extra, f"ref:{label}")
    stats: dict[str, Any] = {"model": params.model, "scored": {}, "kept": {}}
    stats["ties_skipped"] = sum(bool(t) for t in _column(seeds, "tie", False)) if params.seed_candidates else 0
    # Equal answers score equally and would always be "kept": they are no negative at all.
    stats["identical_skipped"] = sum(c["chosen"].strip() == c["rejected"].strip() for c in candidates)
    candidates = [c for c in candidates if c["chosen"].strip() != c["rejected"].strip()]
    if not candidates:
        return _empty(), stats
    table = pa.Table.from_pylist(
        [{"prompt": c["prompt"], "chosen": c["chosen"], "rejected": c["rejected"]} for c in candidates],
        schema=pa.schema([("prompt", pa.list_(MESSAGE_TYPE)), ("chosen", pa.string()), ("rejected", pa.string())]))
    r_chosen, r_rejected = load_scorer(params.model or "", ctx.home)(table)
    kept = []
    for candidate, rc, rr in zip(candidates, r_chosen.tolist(), r_rejected.tolist(), strict=True):
        source = candidate.pop("source")
        group = source.split(":", 1)[0]
        stats["scored"][group] = stats["scored"].get(group, 0) + 1
        if rr >= rc - params.slack:
            stats["kept"][group] = stats["kept"].get(group, 0) + 1
            extra = json.loads(candidate["metadata"]) if candidate.get("metadata") else {}
            candidate["metadata"] = json.dumps({**extra, "rm_model": params.model, "reward_chosen": rc,
                                                "reward_rejected": rr, "candidate_source": source})
            candidate["method"] = f"rm_mined:{group}:margin={rc - rr:.3f}"
            kept.append(candidate)
    stats["scored_total"] = len(candidates)
    stats["kept_total"] = len(kept)
    return pa.Table.from_pylist(kept, schema=OUTPUT_SCHEMA), stats

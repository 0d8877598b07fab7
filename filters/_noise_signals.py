"""The noise filter's signals that need no training: confident learning arithmetic,
neighbourhood agreement, annotator votes, and the logistic combiner.

Everything here is columnar numpy over one table's rows. ``cleanlab`` is not needed: the
confident-learning counts are a few lines for two classes, written to match
``cleanlab.count.compute_confident_joint`` / ``num_label_issues(estimation_method=
"off_diagonal_calibrated")`` and
``cleanlab.filter.find_label_issues(filter_by="prune_by_noise_rate")`` (a test checks
them against cleanlab where it is installed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---- confident learning on pairs ------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def ab_pred_probs(prob_chosen: np.ndarray, a_is_chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as a two-class problem: (labels, pred_probs) with class 1 = "A is better".

    Every given label says "chosen is better", which is one class only; showing each pair
    with a random side first gives both classes, as confident learning needs.
    """
    p_a = np.where(a_is_chosen, prob_chosen, 1.0 - prob_chosen)
    labels = a_is_chosen.astype(np.int64)
    return labels, np.column_stack([1.0 - p_a, p_a])


def confident_joint(labels: np.ndarray, pred_probs: np.ndarray,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Calibrated confident joint C[given, true] (cleanlab's, unrounded; rows sum to class
    counts). ``weights`` (rows x ... broadcast as (B, n)) computes B bootstrap replicates
    at once and returns (B, 2, 2)."""
    w = np.ones((1, len(labels))) if weights is None else np.atleast_2d(weights)
    onehot = np.stack([labels == 0, labels == 1], axis=0).astype(np.float64)  # (2, n)
    counts = w @ onehot.T  # (B, 2): class counts
    # Per-class threshold: the mean probability of class j among rows labelled j.
    sums = np.einsum("bn,jn,nj->bj", w, onehot, pred_probs)
    thresholds = sums / np.maximum(counts, 1e-12)
    confident = pred_probs[None, :, :] >= thresholds[:, None, :] - 1e-6  # (B, n, 2)
    both = confident.all(-1)
    guess = np.where(both, pred_probs.argmax(1)[None, :], confident.argmax(-1))
    counted = confident.any(-1)
    joint = np.zeros((w.shape[0], 2, 2))
    for given in (0, 1):
        for true in (0, 1):
            cell = counted & (guess == true) & (labels == given)[None, :]
            joint[:, given, true] = (w * cell).sum(1)
    diag = np.maximum(joint[:, [0, 1], [0, 1]], 1.0)  # cleanlab keeps one correct row per class
    joint[:, [0, 1], [0, 1]] = diag
    joint = joint / np.maximum(joint.sum(-1, keepdims=True), 1e-12) * counts[:, :, None]
    joint = joint / np.maximum(joint.sum((1, 2), keepdims=True), 1e-12) * counts.sum(1)[:, None, None]
    return joint[0] if weights is None else joint


def noise_rate(labels: np.ndarray, pred_probs: np.ndarray) -> float:
    """Share of off-diagonal mass of the calibrated confident joint."""
    joint = confident_joint(labels, pred_probs)
    return float((joint[0, 1] + joint[1, 0]) / max(joint.sum(), 1e-12))


def noise_rate_interval(labels: np.ndarray, pred_probs: np.ndarray, *, replicates: int = 200,
                        level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Bootstrap percentile interval of :func:`noise_rate` (rows resampled with replacement)."""
    n = len(labels)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rates = []
    for start in range(0, replicates, 50):  # (50, n) weights at a time bounds the memory
        size = min(50, replicates - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        joint = confident_joint(labels, pred_probs, weights)
        rates.append((joint[:, 0, 1] + joint[:, 1, 0]) / np.maximum(joint.sum((1, 2)), 1e-12))
    rates = np.concatenate(rates)
    tail = (1.0 - level) / 2
    return float(np.quantile(rates, tail)), float(np.quantile(rates, 1.0 - tail))


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """cleanlab's ``prune_by_noise_rate``: in each given class, the off-diagonal count of the
    confident joint, taken where the other class beats the given one by the most."""
    joint = confident_joint(labels, pred_probs)
    rounded = _round_rows(joint)
    issue = np.zeros(len(labels), dtype=bool)
    p_given = pred_probs[np.arange(len(labels)), labels]
    margin = (1.0 - p_given) - p_given  # p(other) - p(given)
    for given in (0, 1):
        rows = np.flatnonzero(labels == given)
        count = int(rounded[given, 1 - given])
        if count <= 0 or len(rows) == 0:
            continue
        count = min(count, len(rows) - 1)  # cleanlab keeps at least one row per class
        top = rows[np.argsort(-margin[rows], kind="stable")[:count]]
        issue[top] = margin[top] > 0  # cleanlab never flags a row its model agrees with
    return issue


def _round_rows(joint: np.ndarray) -> np.ndarray:
    """Round each row to integers keeping its total (cleanlab's round_preserving_row_totals)."""
    out = np.floor(joint)
    for row in range(joint.shape[0]):
        short = int(round(joint[row].sum() - out[row].sum()))
        if short > 0:
            order = np.argsort(-(joint[row] - out[row]), kind="stable")[:short]
            out[row, order] += 1
    return out


def mixture_noise_rate(score: np.ndarray, flipped: np.ndarray,
                       quantiles: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2)) -> float:
    """Noise rate of the original labels from a copy with known synthetic flips.

    In the copy, pairs not flipped on purpose carry their original labels, a share rho of
    them wrong: their suspicion scores follow (1 - rho) C + rho F (C: correctly labelled,
    F: wrong). Pairs flipped on purpose are wrong exactly when they were right before:
    rho C + (1 - rho) F. Among the least suspicious pairs, where F has (almost) no mass,
    the ratio of the two groups' shares is rho / (1 - rho): mixture proportion estimation
    with the synthetic flips as the reference sample. The median over a few low
    quantiles steadies it; a weak detector leaves F some mass there, so the estimate
    errs high, never low.
    """
    s0, s1 = score[~flipped], score[flipped]
    if len(s0) < 10 or len(s1) < 5:
        return float("nan")
    ratios = []
    for q in quantiles:
        cut = np.quantile(s0, q)
        below0 = float((s0 <= cut).mean())
        if below0 > 0:
            ratios.append(float((s1 <= cut).mean()) / below0)
    if not ratios:
        return float("nan")
    kappa = min(float(np.median(ratios)), 1.0)
    return kappa / (1.0 + kappa)


def mixture_noise_interval(score: np.ndarray, flipped: np.ndarray, *, replicates: int = 200,
                           level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Bootstrap percentile interval of :func:`mixture_noise_rate` (each group resampled)."""
    rng = np.random.default_rng(seed)
    s0, s1 = score[~flipped], score[flipped]
    if len(s0) < 10 or len(s1) < 5:
        return float("nan"), float("nan")
    rates = []
    for _ in range(replicates):
        a = s0[rng.integers(0, len(s0), len(s0))]
        b = s1[rng.integers(0, len(s1), len(s1))]
        both = np.concatenate([a, b])
        rates.append(mixture_noise_rate(both, np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]))
    rates = np.asarray(rates)
    rates = rates[np.isfinite(rates)]
    if len(rates) == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return float(np.quantile(rates, tail)), float(np.quantile(rates, 1.0 - tail))


# ---- neighbourhood agreement ----------------------------------------------------------------


def neighbour_agreement(directions: np.ndarray, k: int) -> np.ndarray:
    """Does each pair's preference direction agree with its nearest neighbours' labels?

    A pair's direction is (features of chosen) - (features of rejected). Its neighbours are
    searched among every other pair's direction *and its mirror image*, so a neighbour
    that points the same way says "same label", and one whose mirror points the same way
    says "the opposite label". The score is the similarity-weighted share of the first
    kind, mapped to [-1, 1]: near -1, the pair's label contradicts its neighbourhood. No
    model is trained, so this signal errs differently from the reward models.
    """
    return Neighbourhood.search(directions, k).agreement(k)


@dataclass
class Neighbourhood:
    """The nearest directions of every pair among all pairs' directions and their mirrors,
    searched once for every labelling of the pairs.

    Flipping a label mirrors that pair's direction, and the corpus {d, -d} holds both
    mirrors of every pair whatever the labels: so a flipped pair's neighbours are its
    unflipped neighbours mirrored, at the same similarities, and one search serves the real
    labels and every synthetic copy (the noise filter ran 2 searches per labelling).
    """

    n: int
    valid: np.ndarray  # rows with a direction (identical responses have none)
    index: np.ndarray  # (valid, k) neighbour's position in ``valid``
    mirrored: np.ndarray  # (valid, k) bool: the neighbour's mirror image was the match
    weight: np.ndarray  # (valid, k) similarity clipped at 0 (+1e-6), nearest first

    @classmethod
    def search(cls, directions: np.ndarray, k: int) -> Neighbourhood:
        """The ``k`` nearest (fewer where there are fewer pairs) of each pair's direction."""
        from factory.embed import top_k_neighbours

        n = len(directions)
        norms = np.linalg.norm(directions, axis=1)
        valid = np.flatnonzero(norms > 1e-6)
        m = len(valid)
        k_eff = min(k, m - 1)
        if m < 2 or k_eff < 1:
            empty = np.zeros((m, 0))
            return cls(n, valid, empty.astype(np.int64), empty.astype(bool), empty)
        unit = (directions[valid] / norms[valid, None]).astype(np.float32)
        corpus = np.vstack([unit, -unit])
        idx, sims = top_k_neighbours(unit, corpus, k=k_eff + 2, exclude_self=False)
        own = (idx == np.arange(m)[:, None]) | (idx == np.arange(m)[:, None] + m) | (idx < 0)
        sims = np.where(own, np.nan, sims)
        # keep the best k_eff that are not the row itself (own entries sort first at +-1 or last)
        order = np.argsort(np.where(np.isnan(sims), np.inf, -sims), axis=1, kind="stable")[:, :k_eff]
        idx = np.take_along_axis(idx, order, axis=1)
        sims = np.take_along_axis(sims, order, axis=1)
        weight = np.clip(np.nan_to_num(sims, nan=0.0), 0.0, None) + 1e-6
        return cls(n, valid, idx % m, idx >= m, weight)

    def agreement(self, k: int, flips: np.ndarray | None = None) -> np.ndarray:
        """:func:`neighbour_agreement` over the ``k`` nearest (at most the searched number),
        for the labelling with ``flips`` (bool per row; None: the searched one)."""
        out = np.zeros(self.n)
        if not self.index.shape[1] or k < 1:
            return out
        index, weight = self.index[:, :k], self.weight[:, :k]
        sign = np.where(self.mirrored[:, :k], -1.0, 1.0)
        if flips is not None:
            flipped = np.asarray(flips, dtype=bool)[self.valid]
            own = np.where(flipped, -1.0, 1.0)
            # a pair flipped mirrors its query; a neighbour flipped mirrors its labelled direction
            sign = sign * own[:, None] * own[index]
        out[self.valid] = (weight * sign).sum(1) / weight.sum(1)
        return out


# ---- annotator votes -------------------------------------------------------------------------


@dataclass
class VoteEvidence:
    logodds: np.ndarray  # log-odds that the label is wrong given the votes (0 where none)
    dissent: np.ndarray  # share of decisive votes against the label (nan where none)
    accuracy: float  # estimated accuracy of one annotator (nan where it cannot be estimated)


def vote_evidence(agree: np.ndarray, against: np.ndarray) -> VoteEvidence:
    """Annotator votes as evidence of a wrong label (a symmetric Dawid–Skene model).

    Each annotator is right with probability ``a``, independently. Two annotators agree
    with probability ``a^2 + (1-a)^2``, which the data gives (pairs of decisive votes on
    the same row), so ``a`` needs no gold labels. With a uniform prior the log-odds that
    the label is wrong is ``(against - agree) * log(a / (1 - a))``, the term that the
    ensemble adds to its model-based log-odds.
    """
    agree = np.asarray(agree, dtype=np.float64)
    against = np.asarray(against, dtype=np.float64)
    decisive = agree + against
    pairs = decisive * (decisive - 1) / 2
    agreeing = agree * (agree - 1) / 2 + against * (against - 1) / 2
    accuracy = float("nan")
    if pairs.sum() > 0:
        rate = float(agreeing.sum() / pairs.sum())
        accuracy = 0.5 + 0.5 * np.sqrt(max(2 * rate - 1, 0.0))
    a = min(max(accuracy if np.isfinite(accuracy) else 0.75, 0.55), 0.99)
    logodds = (against - agree) * np.log(a / (1 - a))
    dissent = np.divide(against, decisive, out=np.full(len(agree), np.nan), where=decisive > 0)
    return VoteEvidence(logodds=logodds, dissent=dissent, accuracy=accuracy)


# ---- the combiner -----------------------------------------------------------------------------


@dataclass
class Logistic:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, nonnegative: np.ndarray | None = None,
                 iterations: int = 100) -> Logistic:
    """L2-regularised logistic regression by (projected) Newton steps on standardised
    features: a handful of features and a few thousand rows, exact and dependency-free.

    ``nonnegative`` marks coefficients kept >= 0: a signal oriented so that larger means
    "more suspicious" may be ignored but never used backwards. With self-supervised
    labels that are themselves noisy, free signs let correlated signals cancel each
    other with large opposite weights; the constraint removes that instability.
    """
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    d = z.shape[1]
    bounded = np.zeros(d, dtype=bool)
    if nonnegative is not None:
        bounded[:-1] = nonnegative
    w = np.zeros(d)
    penalty = np.full(d, l2)
    penalty[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        free = ~(bounded & (w <= 0) & (grad > 0))  # at the bound and pushed past it: stays
        step = np.zeros(d)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        new = w - step
        new[bounded] = np.maximum(new[bounded], 0.0)
        moved = np.abs(new - w).max()
        w = new
        if moved < 1e-8:
            break
    return Logistic(mean=mean, scale=scale, coef=w[:-1], intercept=float(w[-1]))


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` rows (ties count half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((average_ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (scipy's rankdata, without scipy)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks

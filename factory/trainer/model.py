"""Reward models on disk and in memory: a frozen-encoder MLP head, or a fine-tuned backbone.

A saved model is a folder with ``prefab_model.json`` (what it is and how to feed it) plus
``head.pt`` (head mode: the MLP; the encoder is the base, referenced not copied) or
``hf/`` (full mode: ``save_pretrained`` of the sequence-classification model and tokenizer).
The ``tokens`` and ``top-k`` modes (:mod:`factory.trainer.token_head`) save their net
(attention pooling, head and, for top-k, the trained top layers) as ``head.pt`` too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factory.embed import cache_root as embedding_root
from factory.embed import embed_token_ids, encoder_cache
from factory.embed.cache import EmbeddingCache
from factory.embed.encoder import MeanPoolEncoder, get_encoder
from factory.embed.static import StaticIdsEncoder
from factory.trainer import backbones
from factory.trainer.progress import bar, phase
from factory.trainer.token_cache import TokenIds, encode_cached
from schemas.errors import PrefabError

META_FILE = "prefab_model.json"
FORMAT = "prefab-reward-model/1"


# Head-mode inputs. "pair": the embedding of prompt + response, read together. "pair+parts"
# adds the response read alone and its elementwise product with the prompt read alone: an
# explicit signal of whether this answer belongs to this prompt, and of what the answer is
# on its own (after a long prompt, a content-free "Solution" embeds almost like the prompt).
HEAD_FEATURES = ("pair", "pair+parts")


@dataclass
class ModelSpec:
    mode: str  # "head" | "full" | "tokens" | "top-k"
    base: str  # "minilm", "static" (head mode) or a model folder
    max_length: int
    head_hidden: int = 256
    feature_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    features: str = "pair"  # head mode: one of HEAD_FEATURES

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


class RewardHead(nn.Module):
    """MLP from [prompt+response] embedding features to a scalar reward (``hidden=0``: linear)."""

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class SummedHead(nn.Module):
    """A base head and a residual head over the same features: reward = base + residual.

    The base is frozen (trained on real pairs); the residual was trained on what the base
    gets wrong (see :mod:`factory.trainer.residual`)."""

    def __init__(self, base: RewardHead, residual: RewardHead):
        super().__init__()
        self.base, self.residual = base, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.residual(x)


class HeadFeaturizer:
    """Embeds (prompt, response) with the frozen encoder of the shared embedding service.

    The trainer renders and truncates each pair itself (:func:`backbones.encode_pairs`), so
    the cache (``cache_root``, normally ``$PREFAB_HOME/embeddings``) is keyed by the exact
    token ids; encoder, cache folder, progress bar and Ctrl+C handling are those of
    :mod:`factory.embed`. ``base="static"``: the same rendering and cut through MiniLM's
    tokenizer, pooled by the static model distilled under ``cache_root``
    (:class:`factory.embed.static.StaticIdsEncoder`); nothing is cached, since a lookup
    costs less than reading a cache back (as for :func:`factory.embed.embed_texts`).
    """

    def __init__(
        self,
        base: str,
        max_length: int,
        cache_root: str | Path | None,
        device: torch.device | None = None,
        batch_size: int = 64,
        progress: bool | None = False,
        features: str = "pair",
    ):
        if features not in HEAD_FEATURES:
            raise PrefabError(f"head features must be one of {', '.join(HEAD_FEATURES)}, got {features!r}")
        self.encoder: MeanPoolEncoder | StaticIdsEncoder
        self.cache: EmbeddingCache | None
        if base == backbones.STATIC:
            self.encoder = StaticIdsEncoder(cache_root if cache_root is not None else embedding_root(None))
            self.cache = None
        else:
            self.encoder = get_encoder(backbones.resolve_base(base), device)
            self.cache = encoder_cache(self.encoder, cache_root)
        backbones.check_max_length(max_length, self.encoder.max_positions, base)
        self.features_kind = features
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress

    @property
    def dim(self) -> int:
        return self.encoder.dim * (3 if self.features_kind == "pair+parts" else 1)

    def features(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str]
    ) -> np.ndarray:
        return self.featurize(prompts, responses)[0]

    def featurize(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        responses: Sequence[str],
        *,
        max_length: int | None = None,
        progress: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, truncated): embeddings and whether each input had to be cut."""
        length = max_length or self.max_length
        backbones.check_max_length(length, self.encoder.max_positions, "the encoder")
        show = self.progress if progress is None else progress
        tokenizer = self.encoder.tokenizer
        encoded = backbones.encode_pairs(tokenizer, prompts, responses, length, progress=show)
        feats = self.embed_ids(encoded.ids, progress=show)
        if self.features_kind == "pair":
            return feats, encoded.truncated
        # The response under an empty user turn (a rendering every chat template accepts),
        # and each distinct prompt once, with an empty response.
        alone = backbones.encode_pairs(tokenizer, [[{"role": "user", "content": ""}]] * len(responses),
                                       responses, length, progress=show, desc="tokenize responses")
        response_vecs = self.embed_ids(alone.ids, progress=show)
        slot: dict[tuple[tuple[str, str], ...], int] = {}
        index = np.asarray([slot.setdefault(tuple((m["role"], m["content"]) for m in p), len(slot))
                            for p in prompts], dtype=np.int64)
        distinct = [[{"role": r, "content": c} for r, c in key] for key in slot]
        prompt_only = backbones.encode_pairs(tokenizer, distinct, [""] * len(distinct), length,
                                             progress=show, desc="tokenize prompts")
        prompt_vecs = self.embed_ids(prompt_only.ids, progress=show)[index]
        # Unit vectors: the product's entries are ~1/dim; sqrt(dim) brings them to the
        # scale of the other parts (its sum is then the cosine times sqrt(dim)).
        match = prompt_vecs * response_vecs * np.float32(np.sqrt(self.encoder.dim))
        return np.concatenate([feats, response_vecs, match], axis=1), encoded.truncated

    def embed_ids(self, ids: Sequence[np.ndarray], progress: bool | None = False) -> np.ndarray:
        """Embeddings of token ids: cached ones read back, the rest computed (with a bar);
        the phase line says how many came from the cache (their lookup has no bar)."""
        if self.cache is None:
            with phase("embed (static)", progress, count=len(ids), unit="input"):
                return self.encoder.embed_ids(ids, self.batch_size)
        assert isinstance(self.encoder, MeanPoolEncoder)
        hits = self.cache.hits
        with phase("embed", progress, count=len(ids), unit="input") as info:
            vectors = embed_token_ids(ids, encoder=self.encoder, cache=self.cache,
                                      batch_size=self.batch_size, progress=progress,
                                      desc="embed pairs")
            info["detail"] = f"{self.cache.hits - hits:,} from the cache"
        return vectors


class RewardModel:
    """A trained reward model that scores (prompt, response) pairs."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        head: nn.Module | None = None,
        featurizer: HeadFeaturizer | None = None,
        hf_model: Any = None,
        tokenizer: Any = None,
        device: torch.device | None = None,
    ):
        self.spec = spec
        self.head = head
        self.featurizer = featurizer
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.device = device or backbones.pick_device()

    # ---- scoring
    def reward(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        responses: Sequence[str],
        batch_size: int = 64,
        *,
        max_length: int | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Reward of each (prompt, response), float64 (``max_length``: as for :meth:`score`)."""
        return self.score(prompts, responses, batch_size, max_length=max_length, progress=progress)[0]

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        responses: Sequence[str],
        batch_size: int = 64,
        *,
        max_length: int | None = None,
        progress: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards, truncated): ``max_length`` overrides the length the model trained at."""
        if len(responses) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool)
        length = max_length or self.spec.max_length
        if self.spec.mode in ("tokens", "top-k"):
            from factory.trainer.token_head import token_scores

            return token_scores(self, prompts, responses, batch_size, length, progress)
        if self.spec.mode == "head":
            assert self.head is not None and self.featurizer is not None
            feats, truncated = self.featurizer.featurize(prompts, responses, max_length=length,
                                                         progress=progress)
            return self.reward_features(feats), truncated
        positions = getattr(self.hf_model.config, "max_position_embeddings", 0) or 0
        backbones.check_max_length(length, positions, self.spec.base)
        show = bool(progress)  # unset: quiet, as a head model's featurizer is by default
        # Memory-mapped in a temporary folder: scoring a million pairs holds no list of ids.
        encoded = encode_cached(self.tokenizer, prompts, responses, length, None, progress=show)
        rewards = full_rewards(self.hf_model, self.tokenizer, encoded, self.device, batch_size,
                               progress=show)
        return rewards, encoded.truncated

    @torch.inference_mode()
    def reward_features(self, feats: np.ndarray) -> np.ndarray:
        assert self.head is not None
        self.head.eval()
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(self.device)
        return self.head(x).double().cpu().numpy()

    # ---- persistence
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.spec.mode != "full":  # head, tokens, top-k: the trained module's weights
            assert self.head is not None
            torch.save(self.head.state_dict(), folder / "head.pt")
        else:
            with backbones.quiet_hf():
                self.hf_model.save_pretrained(folder / "hf")
            self.tokenizer.save_pretrained(folder / "hf")
        (folder / META_FILE).write_text(json.dumps(self.spec.to_json(), indent=2))
        return folder


@torch.inference_mode()
def full_rewards(
    model: Any,
    tokenizer: Any,
    ids: Sequence[np.ndarray],
    device: torch.device,
    batch_size: int = 64,
    *,
    progress: bool | None = False,
    bf16: bool | None = None,
) -> np.ndarray:
    """Rewards of tokenised sequences, batched by length so padding stays small.

    ``bf16`` None: bf16 autocast wherever the device supports it; a model trained in fp32
    is validated with ``bf16=False`` so its validation matches its training.
    """
    model.eval()
    out = np.zeros(len(ids), dtype=np.float64)
    lengths = ids.lengths if isinstance(ids, TokenIds) else [len(s) for s in ids]
    order = np.argsort(lengths, kind="stable")
    use_bf16 = backbones.bf16_ok(device) if bf16 is None else (bf16 and device.type == "cuda")
    shown = bar(len(ids), "score", progress, unit="input")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = backbones.pad_batch([ids[i] for i in idx], tokenizer.pad_token_id, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            out[idx] = logits.squeeze(-1).float().cpu().numpy()
            shown.update(len(idx))
    finally:
        shown.close()
    return out


def load_reward_model(
    folder: str | Path,
    *,
    cache_root: str | Path | None = None,
    device: str | torch.device | None = None,
    hidden_root: str | Path | None = None,
) -> RewardModel:
    """``hidden_root``: the tokens/top-k modes' hidden-state cache (None: a temporary one)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise PrefabError(f"{folder} is not a prefab reward model (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.pop("format", None) != FORMAT:
        raise PrefabError(f"{meta_path}: unknown model format")
    spec = ModelSpec(**meta)
    dev = backbones.pick_device(str(device) if device is not None else None)
    if spec.mode in ("tokens", "top-k"):
        from factory.trainer.token_head import load_token_model

        return load_token_model(folder, spec, hidden_root, dev)
    if spec.mode == "head":
        featurizer = HeadFeaturizer(spec.base, spec.max_length, cache_root, dev, features=spec.features)
        head: nn.Module = RewardHead(spec.feature_dim, spec.head_hidden)
        if "residual_of" in spec.extra:
            head = SummedHead(RewardHead(spec.feature_dim, spec.extra["base_head_hidden"]), head)
        head = head.to(dev)
        head.load_state_dict(torch.load(folder / "head.pt", map_location=dev, weights_only=True))
        return RewardModel(spec, head=head, featurizer=featurizer, device=dev)
    hf_dir = str(folder / "hf")
    model = backbones.load_seqcls(hf_dir, dev)
    tokenizer = backbones.load_tokenizer(hf_dir)
    return RewardModel(spec, hf_model=model, tokenizer=tokenizer, device=dev)

"""The ``tokens`` and ``top-k`` modes: a reward model over a frozen encoder's per-token states.

``tokens``: the frozen encoder's last hidden states (cached, :mod:`factory.trainer.hidden_cache`)
are pooled by a learned attention over the tokens (padding masked) and scored by the
head-mode MLP. Mean pooling averages a polite preamble or a list's markup into the answer's
vector by an amount that depends on the answer; attention can learn to weigh such tokens
down. The pooling starts as mean pooling (zero scores), so an untrained model reads the
features head mode reads.

``top-k`` (``trainable_layers`` N): the states entering the encoder's last N layers are
cached; copies of those N layers are trained with the pooling and the head. Scoring new
texts runs the frozen lower layers (through the cache) and then the trained top layers,
which the saved model holds (``head.pt``; loaded with ``weights_only=True``).

Features are head mode's (:data:`factory.trainer.model.HEAD_FEATURES`): ``pair`` pools the
prompt + response read together; ``pair+parts`` adds the response read alone and its
elementwise product with the prompt read alone (scaled by sqrt(dim)), each pooled by its
own attention; pooled vectors are L2-normalised, as the embedding service's are.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factory.embed.encoder import get_encoder
from factory.trainer import backbones
from factory.trainer.hidden_cache import FrozenStates, HiddenStates, HiddenStore
from factory.trainer.model import HEAD_FEATURES, ModelSpec, RewardHead, RewardModel, SummedHead
from factory.trainer.progress import phase
from factory.trainer.token_cache import encode_cached
from schemas.errors import PrefabError

TOKEN_MODES = ("tokens", "top-k")
# In top-k mode the copied layers start from trained weights: they move at this share of the
# head's learning rate (the head and pooling start from scratch and need the full rate).
TOP_LAYER_LR_SCALE = 0.05


def encoder_layers(model: Any) -> nn.ModuleList | None:
    """The transformer layers of a BERT-style encoder (``encoder.layer``), else None."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def check_trainable_layers(mode: str, n: int | None, model: Any, base: str) -> int:
    """The number of layers to train (0 in tokens mode), checked against the backbone."""
    if mode == "tokens":
        return 0
    layers = encoder_layers(model)
    if layers is None:
        raise PrefabError(f"--mode top-k trains the last layers of a BERT-style encoder; {base} has no "
                          "encoder.layer (use --mode tokens or full)")
    if n is None or not 1 <= n <= len(layers):
        raise PrefabError(f"--trainable-layers {n} is out of range: {base} has {len(layers)} layers; "
                          f"choose 1 to {len(layers)}")
    return n


class AttentionPool(nn.Module):
    """Softmax attention over the tokens (padding masked), then L2 normalisation; starts
    as mean pooling."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.score(states).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).unsqueeze(-1)
        return nn.functional.normalize((weights * states).sum(1), dim=-1)


class TopLayers(nn.Module):
    """Trainable copies of a BERT-style encoder's last layers, run on cached states."""

    def __init__(self, model: Any, n: int):
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in encoder_layers(model)[-n:])
        self.layers.requires_grad_(True)
        backbones.disable_dropout(self)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.config, inputs_embeds=states,
                                              attention_mask=mask.long())
        for layer in self.layers:
            out = layer(states, attention)
            states = out[0] if isinstance(out, tuple) else out
        return states


@dataclass
class TokenBatch:
    """Padded states of a batch: the joint reading, and with parts the response alone and
    the distinct prompts alone (``prompt_index``: each row's prompt)."""

    joint: tuple[torch.Tensor, torch.Tensor]
    response: tuple[torch.Tensor, torch.Tensor] | None = None
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None
    prompt_index: torch.Tensor | None = None


class TokenRewardNet(nn.Module):
    """(top layers) -> attention pooling -> the head-mode MLP."""

    def __init__(self, dim: int, hidden: int, features: str, top: TopLayers | None = None):
        super().__init__()
        self.parts = features == "pair+parts"
        self.dim = dim
        self.top = top
        self.pool_joint = AttentionPool(dim)
        if self.parts:
            self.pool_response = AttentionPool(dim)
            self.pool_prompt = AttentionPool(dim)
        self.head = RewardHead(dim * (3 if self.parts else 1), hidden)

    def _read(self, states: torch.Tensor, mask: torch.Tensor, pool: AttentionPool) -> torch.Tensor:
        if self.top is not None:
            states = self.top(states, mask)
        return pool(states, mask)

    def features(self, batch: TokenBatch) -> torch.Tensor:
        joint = self._read(*batch.joint, self.pool_joint)
        if not self.parts:
            return joint
        assert batch.response is not None and batch.prompt is not None and batch.prompt_index is not None
        response = self._read(*batch.response, self.pool_response)
        prompt = self._read(*batch.prompt, self.pool_prompt)[batch.prompt_index]
        return torch.cat([joint, response, prompt * response * math.sqrt(self.dim)], dim=1)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return self.head(self.features(batch))


@dataclass
class TokenInputs:
    """Cached states of ``n`` (prompt, response) inputs and whether each was truncated."""

    joint: HiddenStates
    truncated: np.ndarray
    lengths: np.ndarray  # tokens of each joint input
    response: HiddenStates | None = None
    prompt: HiddenStates | None = None
    prompt_index: np.ndarray | None = None  # each input's row in ``prompt``

    def __len__(self) -> int:
        return len(self.joint)

    def batch(self, rows: np.ndarray, device: torch.device) -> TokenBatch:
        out = TokenBatch(self.joint.batch(rows, device))
        if self.response is None or self.prompt is None or self.prompt_index is None:
            return out
        distinct, index = np.unique(self.prompt_index[rows], return_inverse=True)
        out.response = self.response.batch(rows, device)
        out.prompt = self.prompt.batch(distinct, device)
        out.prompt_index = torch.from_numpy(index.astype(np.int64)).to(device)
        return out


class TokenFeaturizer:
    """Token ids (the trainer's rendering and truncation) -> cached frozen states."""

    def __init__(self, base: str, max_length: int, mode: str, trainable_layers: int | None,
                 hidden_root: str | Path | None, device: torch.device | None = None, *,
                 features: str = "pair", tokens_root: str | Path | None = None,
                 progress: bool | None = False):
        if features not in HEAD_FEATURES:
            raise PrefabError(f"features must be one of {', '.join(HEAD_FEATURES)}, got {features!r}")
        path = backbones.resolve_base(base)
        self.encoder = get_encoder(path, device)
        backbones.check_max_length(max_length, self.encoder.max_positions, base)
        self.device = self.encoder.device
        self.trainable_layers = check_trainable_layers(mode, trainable_layers, self.encoder.model, base)
        self.n_layers = int(self.encoder.model.config.num_hidden_layers)
        self.frozen = FrozenStates(self.encoder.model, self.encoder.tokenizer.pad_token_id,
                                   self.n_layers - self.trainable_layers, self.device)
        self.path = path
        self.hidden_root = hidden_root
        self._stores: dict[int, HiddenStore] = {}
        self.features_kind = features
        self.max_length = max_length
        self.tokens_root = tokens_root
        self.progress = progress
        self.dim = self.encoder.dim

    def store(self, max_length: int | None = None) -> HiddenStore:
        """The state cache for ``max_length`` (states are cached per length)."""
        length = max_length or self.max_length
        if length not in self._stores:
            self._stores[length] = HiddenStore(self.hidden_root, self.frozen, self.path, length)
        return self._stores[length]

    def top_layers(self) -> TopLayers | None:
        """Fresh trainable copies of the backbone's last layers (top-k), else None."""
        if not self.trainable_layers:
            return None
        return TopLayers(self.encoder.model, self.trainable_layers).to(self.device)

    def new_net(self, hidden: int) -> TokenRewardNet:
        return TokenRewardNet(self.dim, hidden, self.features_kind, self.top_layers()).to(self.device)

    def inputs(self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *,
               max_length: int | None = None, progress: bool | None = None) -> TokenInputs:
        length = max_length or self.max_length
        backbones.check_max_length(length, self.encoder.max_positions, "the encoder")
        store = self.store(length)
        show = self.progress if progress is None else progress
        tok = self.encoder.tokenizer
        with phase("tokens: hidden states", show, count=len(responses), unit="input") as info:
            before = self.frozen.forwards
            ids = encode_cached(tok, prompts, responses, length, self.tokens_root, progress=show,
                                desc="tokenize pairs")
            out = TokenInputs(store.states(ids, progress=show, desc="hidden states (pairs)"),
                              ids.truncated, ids.lengths)
            if self.features_kind == "pair+parts":
                alone = encode_cached(tok, [[{"role": "user", "content": ""}]] * len(responses), responses,
                                      length, self.tokens_root, progress=show, desc="tokenize responses")
                out.response = store.states(alone, progress=show, desc="hidden states (responses)")
                slot: dict[tuple[tuple[str, str], ...], int] = {}
                out.prompt_index = np.asarray(
                    [slot.setdefault(tuple((m["role"], m["content"]) for m in p), len(slot)) for p in prompts],
                    dtype=np.int64)
                distinct = [[{"role": r, "content": c} for r, c in key] for key in slot]
                prompt_ids = encode_cached(tok, distinct, [""] * len(distinct), length, self.tokens_root,
                                           progress=show, desc="tokenize prompts")
                out.prompt = store.states(prompt_ids, progress=show, desc="hidden states (prompts)")
            info["detail"] = f"{self.frozen.forwards - before} encoder batches run"
        return out


@torch.inference_mode()
def net_rewards(net: nn.Module, inputs: TokenInputs, rows: np.ndarray, device: torch.device,
                batch_size: int = 64) -> np.ndarray:
    """Rewards of ``rows`` of ``inputs``, batched by length (little padding)."""
    was_training = net.training
    net.eval()
    out = np.zeros(len(rows), dtype=np.float64)
    order = np.argsort(inputs.lengths[rows], kind="stable")
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        out[pick] = net(inputs.batch(rows[pick], device)).double().cpu().numpy()
    net.train(was_training)
    return out


def token_scores(model: RewardModel, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str],
                 batch_size: int, max_length: int | None, progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, truncated) of a tokens/top-k model: frozen states (cached), then its net."""
    assert model.head is not None and isinstance(model.featurizer, TokenFeaturizer)
    inputs = model.featurizer.inputs(prompts, responses, max_length=max_length, progress=progress)
    rewards = net_rewards(model.head, inputs, np.arange(len(inputs)), model.device, batch_size)
    return rewards, inputs.truncated


class TokensTask:
    """The training loop's task for the tokens and top-k modes (see ``loop._Task``)."""

    def __init__(self, data: Any, cfg: Any, device: torch.device, hidden_root: str | Path | None,
                 tokens_root: str | Path | None, rows: np.ndarray):
        self.cfg = cfg
        self.device = device
        with phase(f"load encoder {cfg.base}", cfg.progress):
            self.featurizer = TokenFeaturizer(cfg.base, cfg.max_length, cfg.mode, cfg.trainable_layers,
                                              hidden_root, device, features=cfg.features,
                                              tokens_root=tokens_root, progress=cfg.progress)
        self.rows = np.asarray(rows, dtype=np.int64)
        part = data.subset(self.rows)
        started = time.perf_counter()
        self.inputs = self.featurizer.inputs(part.prompts + part.prompts, part.chosen + part.rejected,
                                             progress=cfg.progress)
        self.embed_seconds = time.perf_counter() - started
        n = len(self.rows)
        self.truncated = np.zeros(len(data), dtype=bool)
        self.truncated[self.rows] = self.inputs.truncated[:n] | self.inputs.truncated[n:]
        self.lengths = np.zeros(len(data), dtype=np.int64)
        self.lengths[self.rows] = np.maximum(self.inputs.lengths[:n], self.inputs.lengths[n:])
        torch.manual_seed(cfg.seed)
        self.module = self.featurizer.new_net(cfg.head_hidden)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The copied top layers move slower than the new pooling and head."""
        top = [p for n, p in self.module.named_parameters() if n.startswith("top.")]
        rest = [p for n, p in self.module.named_parameters() if not n.startswith("top.")]
        groups = [{"params": rest, "lr": lr}]
        if top:
            groups.append({"params": top, "lr": lr * TOP_LAYER_LR_SCALE})
        return groups

    def _positions(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows, idx)

    def rewards(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self._positions(idx)
        both = self.module(self.inputs.batch(np.concatenate([pos, pos + len(self.rows)]), self.device))
        return both[: len(idx)], both[len(idx) :]

    def eval_rewards(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = self._positions(idx)
        out = net_rewards(self.module, self.inputs, np.concatenate([pos, pos + len(self.rows)]), self.device,
                          self.cfg.eval_batch_size)
        return out[: len(idx)], out[len(idx) :]

    def to_reward_model(self) -> RewardModel:
        spec = ModelSpec(self.cfg.mode, self.cfg.base, self.cfg.max_length, self.cfg.head_hidden,
                         self.featurizer.dim, features=self.cfg.features,
                         extra={"trainable_layers": self.featurizer.trainable_layers})
        return RewardModel(spec, head=self.module.eval(), featurizer=self.featurizer, device=self.device)


def load_token_model(folder: Path, spec: ModelSpec, hidden_root: str | Path | None,
                     device: torch.device) -> RewardModel:
    """A saved tokens/top-k model: the base's frozen encoder, the saved net (with its top layers)."""
    n = int(spec.extra.get("trainable_layers", 0))
    featurizer = TokenFeaturizer(spec.base, spec.max_length, spec.mode, n or None, hidden_root, device,
                                 features=spec.features)
    net: nn.Module = featurizer.new_net(spec.head_hidden)
    if "residual_of" in spec.extra:
        net = SummedHead(featurizer.new_net(spec.extra["base_head_hidden"]), net)
    net.load_state_dict(torch.load(folder / "head.pt", map_location=featurizer.device, weights_only=True))
    return RewardModel(spec, head=net.to(featurizer.device).eval(), featurizer=featurizer,
                       device=featurizer.device)


__all__ = ["TOKEN_MODES", "AttentionPool", "TokenFeaturizer", "TokenRewardNet", "TokensTask",
           "load_token_model", "token_scores"]

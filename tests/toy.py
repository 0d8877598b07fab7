"""Test fixtures (not shipped with the package): a trivially separable pair set and tiny
randomly initialised backbones that reuse the bundled MiniLM tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from factory.embed.encoder import load_tokenizer, minilm_path, quiet_hf
from schemas.pairs import Message, Pair, Provenance, pairs_to_table

_TOPICS = [
    ("the capital of France", "The capital of France is Paris."),
    ("how plants make food", "Plants make food by photosynthesis, using sunlight, water and CO2."),
    ("why the sky is blue", "Air molecules scatter blue light more than red light."),
    ("what a prime number is", "A prime number has exactly two divisors: one and itself."),
    ("how to boil an egg", "Put the egg in boiling water for about nine minutes."),
    ("what DNA stands for", "DNA stands for deoxyribonucleic acid."),
    ("who wrote Hamlet", "Hamlet was written by William Shakespeare."),
    ("how tall Mount Everest is", "Mount Everest is about 8,849 metres tall."),
    ("what causes tides", "Tides are caused mainly by the Moon's gravity."),
    ("how a vaccine works", "A vaccine trains the immune system to recognise a pathogen."),
    ("what the speed of light is", "Light travels at about 300,000 kilometres per second."),
    ("how to say thank you in Spanish", "In Spanish, thank you is 'gracias'."),
    ("what an atom is made of", "An atom is made of protons, neutrons and electrons."),
    ("why we need sleep", "Sleep lets the brain and body recover and consolidate memory."),
    ("what the largest ocean is", "The Pacific is the largest ocean on Earth."),
    ("how many legs a spider has", "A spider has eight legs."),
    ("what inflation means", "Inflation is a general rise in prices over time."),
    ("how a rainbow forms", "Sunlight is refracted and reflected inside raindrops."),
    ("what the boiling point of water is", "Water boils at 100 degrees Celsius at sea level."),
    ("who painted the Mona Lisa", "Leonardo da Vinci painted the Mona Lisa."),
]
_ASKS = ["Tell me {t}.", "Can you explain {t}?", "I want to know {t}.", "Quick question: {t}?"]
_BAD = [
    "Shut up, you idiot. I hate you.",
    "Go away, stupid loser, nobody cares.",
    "You are a moron and I will not help you, idiot.",
    "What a dumb question, get lost you fool.",
]


def toy_pairs(n: int = 40, seed: int = 0, *, ties: int = 0, source: str = "toy") -> pa.Table:
    """``n`` pairs where the chosen answer is on topic and the rejected one is an insult;
    plus ``ties`` tie pairs (two phrasings of the same good answer)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n + ties):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        ask = _ASKS[(i // len(_TOPICS)) % len(_ASKS)].format(t=topic)
        prompt = [Message("user", ask)]
        prov = Provenance(source=source if i % 2 == 0 else f"{source}-b", step="toy", seed=seed)
        if i < n:
            pairs.append(Pair(prompt, answer, rng.choice(_BAD), provenance=prov,
                              task="qa" if i % 3 else "facts"))
        else:
            pairs.append(Pair(prompt, answer, f"Sure! {answer}", tie=True, provenance=prov, task="qa"))
    return pairs_to_table(pairs)


def tiny_backbone(folder: str | Path, kind: str = "bert", chat_template: str | None = None) -> str:
    """Save a tiny random ``kind`` ('bert' or 'llama') sequence-classification model with the
    MiniLM tokenizer to ``folder``; return the folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    folder = Path(folder)
    tokenizer = load_tokenizer(minilm_path())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    vocab = len(tokenizer)
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=512, num_labels=1)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                             max_position_embeddings=512, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"unknown tiny backbone kind {kind!r}")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with quiet_hf():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

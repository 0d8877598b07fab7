"""Full mode's memory-mapped token cache: same ids as encode_pairs, reused, keyed by tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from factory.trainer import backbones
from factory.trainer.backbones import encode_pairs, load_tokenizer, minilm_path
from factory.trainer.token_cache import TokenIds, encode_cached
from tests.toy import tiny_backbone

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class CountingTokenizer:
    """A tokenizer that counts its tokenising calls and forwards everything else."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _pairs() -> tuple[list[list[dict[str, str]]], list[str]]:
    """Short pairs and long ones (a long dialogue, a long answer) that must be truncated."""
    long_dialogue = [
        {"role": "system", "content": "You are terse. " * 30},
        {"role": "user", "content": "Tell me about rivers. " * 20},
        {"role": "assistant", "content": "Rivers flow. " * 25},
        {"role": "user", "content": "What is six times seven?"},
    ]
    prompts, responses = [], []
    for i in range(7):
        prompts.append([{"role": "user", "content": f"question {i}"}])
        responses.append(f"answer {i}")
        prompts.append(long_dialogue)
        responses.append(f"Let me think {i}. " + "step by step " * 40 + "The answer is 42.")
    prompts.append([{"role": "user", "content": ""}])
    responses.append("")
    return prompts, responses


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(minilm_path())


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tiny_backbone(tmp_path_factory.mktemp("chat"), "llama", chat_template=CHAT_TEMPLATE)
    return load_tokenizer(folder)


def _same(cached: TokenIds, expected: backbones.Encoded) -> None:
    assert len(cached) == len(expected.ids)
    for got, want in zip(cached, expected.ids, strict=True):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cached.truncated, expected.truncated)
    np.testing.assert_array_equal(cached.lengths, [len(s) for s in expected.ids])


@pytest.mark.parametrize("which", ["tokenizer", "chat_tokenizer"])
def test_cache_gives_exactly_the_ids_of_encode_pairs(which, request, tmp_path, monkeypatch):
    tok = request.getfixturevalue(which)
    prompts, responses = _pairs()
    expected = encode_pairs(tok, prompts, responses, 64)
    assert expected.truncated.any() and not expected.truncated.all()
    monkeypatch.setattr(backbones, "ENCODE_CHUNK", 4)  # written over several chunks
    _same(encode_cached(tok, prompts, responses, 64, tmp_path / "tokens"), expected)
    temporary = encode_cached(tok, prompts, responses, 64, None)  # an uncached entry
    _same(temporary, expected)
    folder = temporary.folder
    del temporary
    assert not folder.parent.exists()  # removed with its last reference


def test_a_second_run_reuses_the_entry_without_tokenizing(tokenizer, tmp_path):
    prompts, responses = _pairs()
    first = CountingTokenizer(tokenizer)
    made = encode_cached(first, prompts, responses, 64, tmp_path)
    assert first.calls > 0
    again = CountingTokenizer(tokenizer)
    reused = encode_cached(again, prompts, responses, 64, tmp_path)
    assert again.calls == 0
    assert reused.folder == made.folder and [p.name for p in tmp_path.iterdir()] == [made.folder.name]
    np.testing.assert_array_equal(np.asarray(reused.ids), np.asarray(made.ids))


def test_another_tokenizer_length_or_text_makes_another_entry(tokenizer, chat_tokenizer, tmp_path):
    prompts, responses = _pairs()
    folders = {
        encode_cached(tokenizer, prompts, responses, 64, tmp_path).folder,
        encode_cached(chat_tokenizer, prompts, responses, 64, tmp_path).folder,
        encode_cached(tokenizer, prompts, responses, 48, tmp_path).folder,
        encode_cached(tokenizer, prompts, [*responses[:-1], "changed"], 64, tmp_path).folder,
    }
    assert len(folders) == 4 and sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in folders)
    # The same tokenizer's files, vocabulary and name: the same entry.
    same = load_tokenizer(minilm_path())
    assert encode_cached(same, prompts, responses, 64, tmp_path).folder in folders


def test_an_interrupted_write_leaves_no_entry(tokenizer, tmp_path, monkeypatch):
    prompts, responses = _pairs()
    monkeypatch.setattr(backbones, "ENCODE_CHUNK", 4)
    failing = InterruptedTokenizer(tokenizer, after_calls=5)  # a few chunks in
    with pytest.raises(KeyboardInterrupt):
        encode_cached(failing, prompts, responses, 64, tmp_path)
    assert list(tmp_path.iterdir()) == []
    _same(encode_cached(tokenizer, prompts, responses, 64, tmp_path),
          encode_pairs(tokenizer, prompts, responses, 64))


class InterruptedTokenizer(CountingTokenizer):
    """A tokenizer stopped (Ctrl+C) after ``after_calls`` tokenising calls."""

    def __init__(self, inner: Any, after_calls: int):
        super().__init__(inner)
        self.after_calls = after_calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= self.after_calls:
            raise KeyboardInterrupt
        return super().__call__(*args, **kwargs)


def test_a_damaged_entry_is_written_again(tokenizer, tmp_path):
    prompts, responses = _pairs()
    made = encode_cached(tokenizer, prompts, responses, 64, tmp_path)
    ids_file: Path = made.folder / "ids.bin"
    del made
    ids_file.write_bytes(ids_file.read_bytes()[:-8])  # cut short (a full disk, say)
    counting = CountingTokenizer(tokenizer)
    _same(encode_cached(counting, prompts, responses, 64, tmp_path),
          encode_pairs(tokenizer, prompts, responses, 64))
    assert counting.calls > 0

"""Embeddings on Ray (``--engine ray``): the plan, the actors' keys, and a whole-table step that
then finds every vector in the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from factory.embed import embed_texts
from factory.embed.ray_embed import (
    EmbedActor,
    EmbedRequest,
    PlanCounts,
    plain_key,
    plan_missing,
    pool_shape,
    tail_key,
)
from factory.steps import StepContext
from factory.steps.runner import execute, prepare
from schemas.pairs import Message, Pair, pairs_to_table

TOPICS = ["volcanoes", "tides", "photosynthesis", "the moon landing", "bread baking", "chess openings",
          "monsoon winds", "honey bees", "glaciers", "the printing press"]
# ~700 tokens: longer than the encoder's 256, so its start and its end are different vectors
LONG = "Read the handbook excerpt below, then answer.\n" + "\n".join(
    f"Fact {i}: the {t} section of the handbook lists {i + 3} numbered rules." for i, t in enumerate(TOPICS * 4))


def _pairs() -> list[Pair]:
    pairs = [Pair([Message("user", f"Write a short explanation of {t} for a curious twelve year old.")],
                  f"Here is how {t} work: a clear account with three examples and a summary.",
                  f"{t} are a thing.") for t in TOPICS]
    paraphrase = Pair([Message("user", f"For a curious 12-year-old, write a brief explanation of {TOPICS[2]}.")],
                      pairs[2].chosen, pairs[2].rejected)
    exact = Pair([Message("user", pairs[4].prompt[0].content.upper())], pairs[4].chosen, pairs[4].rejected)
    long_a = Pair([Message("user", LONG + "\nQuestion: how many rules has the jazz section?")], "Five.", "Two.")
    long_b = Pair([Message("user", LONG + "\nQuestion: which section is the longest?")], "Tides.", "Bees.")
    return [*pairs, paraphrase, exact, long_a, long_b]


# ---- the plan (no Ray, no model) ---------------------------------------------------------


def test_plan_sends_each_missing_text_once_with_every_cut_it_needs() -> None:
    cached = {plain_key("cached start"), tail_key("cached end")}
    requests = [
        EmbedRequest(["a", "b", "a", "cached start"]),
        EmbedRequest(["a", "c", "cached end", "cached start"], keep=("start", "end")),
        EmbedRequest(["c", "d"], keep=("end",)),
    ]
    counts = PlanCounts()
    chunks = list(plan_missing(requests, cached.__contains__, chunk_rows=3, counts=counts))
    rows = pa.concat_tables(chunks).to_pylist()
    assert [c.num_rows for c in chunks] == [3, 3, 1]
    assert (counts.asked, counts.distinct, counts.sent) == (10, 6, 7)
    by_text = {(r["text"], r["start"], r["end"]): r["plain_elsewhere"] for r in rows}
    assert by_text == {
        ("a", True, False): True,
        ("b", True, False): True,
        # "a" asked again with its end: only the end travels; an uncut "a" is its start vector
        ("a", False, True): True,
        ("c", True, True): True,  # start and end in one row: an uncut "c" is encoded once
        ("cached end", True, False): True,  # its end is cached, its start is not
        ("cached start", False, True): True,  # the worker encodes its end only if it is cut
        # only its end is wanted and no start vector exists: the worker encodes it cut or not
        ("d", False, True): False,
    }


def test_plan_is_empty_when_everything_is_cached() -> None:
    texts = ["x", "y"]
    cached = {plain_key(t) for t in texts} | {tail_key(t) for t in texts}
    assert list(plan_missing([EmbedRequest(texts, keep=("start", "end"))], cached.__contains__)) == []


def test_pool_shape_gives_one_actor_per_gpu_else_shares_the_cpus() -> None:
    assert pool_shape({"CPU": 16, "GPU": 4}, None).actors == 4
    assert pool_shape({"CPU": 16, "GPU": 4}, 8).actors == 4
    cpu = pool_shape({"CPU": 8}, 2)
    assert (cpu.actors, cpu.gpus_per_actor, cpu.threads) == (2, 0, 4)
    assert pool_shape({"CPU": 2}, None).actors == 2
    with pytest.raises(Exception, match="num_actors must be at least 1"):
        pool_shape({"CPU": 2}, 0)


def test_embed_request_refuses_an_unknown_cut() -> None:
    with pytest.raises(ValueError, match="keep must name"):
        EmbedRequest(["a"], keep=("middle",))  # type: ignore[arg-type]


# ---- the actor's keys equal what the step asks for (no Ray: the actor called here) -------


def _count_encoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from factory.embed.encoder import MeanPoolEncoder

    calls: list[int] = []
    real = MeanPoolEncoder.embed_ids

    def counted(self, sequences, batch_size=64):  # type: ignore[no-untyped-def]
        calls.append(len(sequences))
        return real(self, sequences, batch_size)

    monkeypatch.setattr(MeanPoolEncoder, "embed_ids", counted)
    return calls


def _fill_in_process(requests: list[EmbedRequest], home: Path) -> int:
    """What precompute does, with the actor called here instead of on Ray."""
    from factory.embed import cache_root, encoder_cache
    from factory.embed.encoder import get_encoder

    encoder = get_encoder()
    cache = encoder_cache(encoder, cache_root(home))
    actor = EmbedActor(encoder.path, encoder.cache_variant, 64, None)
    stored = 0
    for chunk in plan_missing(requests, cache.__contains__):
        out = actor(chunk)
        vectors = np.asarray(out.column("vector").combine_chunks().flatten()).reshape(out.num_rows, -1)
        stored += cache.put(out.column("key").to_pylist(), vectors)
    return stored


@pytest.mark.slow  # encodes ~60 texts twice, long ones included (~40 s on 2 busy cores)
def test_dedup_after_the_declared_texts_are_encoded_calls_no_encoder(tmp_path, monkeypatch) -> None:
    table = pairs_to_table(_pairs())
    prepared = prepare("filter", "dedup", {"near": "embedding"})
    ctx = StepContext("dedup", prepared.params, home=tmp_path / "ray")
    requests = list(prepared.spec.embeds(table, ctx))
    stored = _fill_in_process(requests, tmp_path / "ray")
    # one vector per distinct text, two for a text longer than the encoder reads (LONG prompts)
    assert stored == len({t for r in requests for t in r.texts}) + 2
    calls = _count_encoder_calls(monkeypatch)
    precomputed = execute(prepared, table, ctx)
    assert calls == []
    local = execute(prepared, table, StepContext("dedup", prepared.params, home=tmp_path / "local"))
    assert calls  # the same run without the precompute does encode
    # same neighbours; the cosines agree to float32 rounding (batches padded to other widths)
    for column in ("exact_of", "near_of"):
        assert precomputed.table[column].to_pylist() == local.table[column].to_pylist(), column
    np.testing.assert_allclose(precomputed.table["near_similarity"].to_numpy(),
                               local.table["near_similarity"].to_numpy(), atol=1e-5)
    assert precomputed.table["near_of"][len(TOPICS)].as_py() == table["pair_id"][2].as_py()


def test_texts_cut_at_the_end_get_the_vectors_embed_texts_gives_them(tmp_path) -> None:
    texts = ["short text", LONG, LONG + " and more"]
    _fill_in_process([EmbedRequest(texts, keep=("start", "end"))], tmp_path / "ray")
    for keep in ("start", "end"):
        np.testing.assert_allclose(embed_texts(texts, home=tmp_path / "ray", keep=keep),
                                   embed_texts(texts, home=tmp_path / "local", keep=keep), atol=1e-5)


# ---- on a local Ray --------------------------------------------------------------------


@pytest.mark.slow
def test_dedup_on_ray_gives_the_pair_ids_and_labels_of_the_in_process_run(tmp_path, monkeypatch) -> None:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'prefab[ray]')")
    from factory.catalog import Catalog
    from factory.steps import api

    table = pairs_to_table(_pairs())
    for home in ("local", "ray"):
        Catalog(tmp_path / home).commit("seeds", table)
    settings = {"near": "embedding"}
    local = api.filter("dedup", "seeds", "clean", settings=settings, home=tmp_path / "local")
    calls = _count_encoder_calls(monkeypatch)  # the driver's encoder; the actors are other processes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = api.filter("dedup", "seeds", "clean", settings=settings, home=tmp_path / "ray", engine="ray")
    finally:
        ray.shutdown()
    assert calls == []
    a = Catalog(tmp_path / "local").read_table(local["ref"])
    b = Catalog(tmp_path / "ray").read_table(on_ray["ref"])
    for column in ("pair_id", "chosen", "rejected", "tie"):
        assert a[column].to_pylist() == b[column].to_pylist(), column
    assert a.num_rows == table.num_rows - 2  # the exact and the paraphrased duplicate dropped


# ---- each declaration names what its step embeds -----------------------------------------


class _Asked(Exception):
    pass


def test_hard_negatives_declares_the_instructions_contrast_mode_embeds() -> None:
    from tests.test_gen_hard_negatives import _seeds

    table = _seeds()
    prepared = prepare("generator", "hard_negatives", {})
    ctx = StepContext("hard_negatives", prepared.params)
    asked: list[str] = []

    def first_embed(texts: list[str], embedder: str = "minilm") -> np.ndarray:
        asked.extend(texts)
        raise _Asked  # the instructions come first; the answers depend on their neighbours

    ctx.embed = first_embed  # type: ignore[method-assign]
    with pytest.raises(_Asked):
        execute(prepared, table, ctx)
    declared = [t for r in prepared.spec.embeds(table, ctx) for t in r.texts]
    assert asked and set(declared) == set(asked)
    mining = prepare("generator", "hard_negatives", {"mode": "rm_mining", "model": "x"})
    assert list(mining.spec.embeds(table, StepContext("hard_negatives", mining.params))) == []


def test_dedup_declares_nothing_unless_near_duplicates_are_embedded() -> None:
    table = pairs_to_table(_pairs())
    for near in ("minhash", "none"):
        prepared = prepare("filter", "dedup", {"near": near})
        assert list(prepared.spec.embeds(table, StepContext("dedup", prepared.params))) == []


def test_steps_declare_nothing_for_ray_when_another_embedder_is_chosen() -> None:
    # Ray actors encode with MiniLM on torch: precomputing for static or ONNX would fill a cache
    # the step never reads, so those vectors are made on the driver.
    table = pairs_to_table(_pairs())
    for kind, step, settings in (("filter", "dedup", {"near": "embedding"}), ("generator", "hard_negatives", {})):
        for embedder in ("static", "minilm-onnx"):
            prepared = prepare(kind, step, {**settings, "embedder": embedder})
            assert list(prepared.spec.embeds(table, StepContext(step, prepared.params))) == []
    prepared = prepare("filter", "dedup", {"near": "embedding"})
    assert list(prepared.spec.embeds(table, StepContext("dedup", prepared.params)))


def test_noise_after_the_declared_inputs_are_encoded_calls_no_encoder(tmp_path, monkeypatch) -> None:
    import filters.noise as noise_module
    from tests.test_filter_noise import flipped_table

    table = flipped_table(24, flipped=(3,), ties=2)
    static = prepare("filter", "noise", {"base": "static", "embedder": "static"})
    # static vectors are a lookup in process: nothing for Ray to encode
    assert list(static.spec.embeds(table, StepContext("noise", static.params, home=tmp_path))) == []
    prepared = prepare("filter", "noise", {"base": "minilm", "embedder": "minilm"})
    ctx = StepContext("noise", prepared.params, home=tmp_path, progress=False)
    requests = list(prepared.spec.embeds(table, ctx))
    assert [len(r.ids) for r in requests] == [48, 0] and len(requests[1].texts) == 48  # ties unscored
    assert _fill_in_process(requests, tmp_path) > 0
    calls = _count_encoder_calls(monkeypatch)

    def features_then_stop(views, ctx):  # noqa: ANN001, ANN202 - the hook's signature
        raise _Asked  # the features are what embeds; the heads after them train on them

    monkeypatch.setattr(noise_module, "score_views", features_then_stop)
    with pytest.raises(_Asked):
        execute(prepared, table, ctx)
    assert calls == []


def test_a_rerun_with_everything_cached_starts_no_ray(tmp_path, monkeypatch) -> None:
    import factory.embed.ray_embed as ray_embed
    from factory.embed import cache_root, encoder_cache
    from factory.embed.encoder import get_encoder

    texts = ["first text", "second text"]
    encoder = get_encoder()
    cache = encoder_cache(encoder, cache_root(tmp_path))
    cache.put([plain_key(t) for t in texts], np.ones((2, encoder.dim), np.float32))

    def no_ray(address):  # noqa: ANN001, ANN202
        raise AssertionError("Ray started with nothing to encode")

    monkeypatch.setattr(ray_embed, "start_ray", no_ray)
    report = ray_embed.precompute([EmbedRequest(texts), EmbedRequest(texts[:1])], home=tmp_path)
    assert (report.asked, report.distinct, report.computed) == (3, 2, 0)


def test_a_worker_without_the_encoder_says_so_in_one_line(tmp_path) -> None:
    from factory.embed.ray_embed import prefab_cause
    from schemas.errors import PrefabError

    with pytest.raises(PrefabError, match="Ray worker has no encoder folder") as raised:
        EmbedActor(str(tmp_path / "absent"), "meanpool-l2|fp32", 64, None)
    # Ray hands the driver the worker's error wrapped, as a cause of its own exception
    try:
        try:
            raise raised.value
        except PrefabError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as wrapped:
        assert prefab_cause(wrapped) is raised.value
    assert prefab_cause(RuntimeError("other")) is None

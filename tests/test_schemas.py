from __future__ import annotations

import pyarrow as pa
import pytest

from schemas import PAIR_SCHEMA, Message, Pair, Provenance, conform, pair_id_of, pairs_to_table


def test_pair_id_names_the_comparison_not_the_verdict():
    prompt = [{"role": "user", "content": "2+2?"}]
    assert pair_id_of(prompt, "4", "5") == pair_id_of(prompt, "5", "4")
    assert pair_id_of(prompt, "4", "5") != pair_id_of([{"role": "system", "content": "2+2?"}], "4", "5")
    assert pair_id_of(prompt, "4", "5") != pair_id_of(prompt, "4", "6")


def test_pair_round_trips_through_arrow():
    pair = Pair(
        prompt=[Message("user", "hi")], chosen="hello", rejected="go away", margin=1.5, votes=[1, 1, -1],
        attribute="politeness", provenance=Provenance(source="demo", parent_ids=["a"]),
        metadata={"k": 1},
    )
    table = pairs_to_table([pair])
    assert table.schema == PAIR_SCHEMA
    back = Pair.from_row(table.to_pylist()[0])
    assert back == pair


def test_conform_adds_optional_columns_and_rejects_missing_required():
    table = pairs_to_table([Pair(prompt=[Message("user", "q")], chosen="a", rejected="b")])
    slim = table.select(["pair_id", "prompt_id", "prompt", "chosen", "rejected", "tie"])
    assert conform(slim).schema == PAIR_SCHEMA
    with pytest.raises(ValueError, match="lacks required column"):
        conform(pa.table({"pair_id": ["x"]}))

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


def test_the_one_prompt_renderer_and_last_user_turn():
    from schemas.prompts import last_user_at, last_user_text, prompt_text

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert prompt_text(chat) == "[system] Be brief.\n[user] Hi\n[assistant] Hello\n[user] 2+2?"
    assert prompt_text(chat, separator="\n\n").count("\n\n") == 3
    assert prompt_text(chat, roles=False) == "Be brief.\nHi\nHello\n2+2?"
    assert prompt_text(chat[3:]) == "2+2?" and prompt_text(None) == "" and prompt_text("as is") == "as is"
    assert last_user_at(chat) == 3 and last_user_text(chat) == "2+2?"
    # an empty last user turn is no instruction; a prompt without any user turn is all text
    assert last_user_text([*chat, {"role": "user", "content": "  "}]) == "2+2?"
    assert last_user_at(chat[:1]) is None and last_user_text(chat[:1]) == "Be brief." and last_user_text([]) == ""

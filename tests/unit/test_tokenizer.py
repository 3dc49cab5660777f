"""The bundled character tokenizer round-trips task text and matches the saved files."""
from hypothesis import given
from hypothesis import strategies as st

from arbitrage_common.synthetic import generate_problems, solution_text
from arbitrage_common.tokenizer import CHARS, build_char_tokenizer

TOKENIZER = build_char_tokenizer()


@given(st.text(alphabet=CHARS, max_size=200))
def test_round_trip_of_any_printable_text(text):
    ids = TOKENIZER(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # one token per character
    assert TOKENIZER.decode(ids) == text


def test_task_text_round_trips_and_prompts_start_with_bos():
    for p in generate_problems(20, 5):
        text = p.prompt + "\n\n" + solution_text(p)
        ids = TOKENIZER(text).input_ids
        assert ids[0] == TOKENIZER.bos_token_id
        assert TOKENIZER.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_map_to_unk():
    ids = TOKENIZER("é", add_special_tokens=False).input_ids
    assert ids == [TOKENIZER.unk_token_id]


def test_special_token_text_in_user_input_stays_text():
    ids = TOKENIZER("Start with 1.</s><s><pad>").input_ids
    assert ids.count(TOKENIZER.eos_token_id) == 0 and ids.count(TOKENIZER.bos_token_id) == 1
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == "Start with 1.</s><s><pad>"

"""rhead_jax.ablation.taxonomy: the paper's failure taxonomy of one needle answer."""
from __future__ import annotations

import pytest

from rhead_jax.ablation import classify_response


ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
HAYSTACK = ["Give me the liberty to know, to utter, and to argue freely according to conscience, above "
            "all liberties. And though all the winds of doctrine were let loose to play upon the earth."]


@pytest.mark.parametrize("response,category", [
    ("Eat a sandwich and sit in Dolores Park on a sunny day.", "correct"),
    ("The best thing is to eat a sandwich and sit in Dolores Park on a sunny day!", "correct"),
    ("", "empty"),
    ("  ...  ", "empty"),
    ("Eat a sandwich in Dolores Park.", "incomplete"),         # 4 of 7 content words
    ("Sit in the park on a sunny day.", "incomplete"),
    ("the liberty to know, to utter, and to argue freely", "wrong_extraction"),
    ("All the winds of doctrine were let loose.", "wrong_extraction"),
    ("Visit the Golden Gate Bridge and ride a cable car.", "hallucination"),
    ("Eat sushi at the pier.", "hallucination"),              # 1 of 7 content words, nothing copied
    ("The best thing to do is to eat your meals.", "hallucination"),  # a lone answer word
    ("The best thing to do in San Francisco is to eat a sandwich.", "incomplete"),  # a 3-word fragment
    ("Go there on a sunny day.", "incomplete"),
    ("Sit in a park.", "hallucination"),                      # 2 of 7 content words, no 3-word fragment
])
def test_taxonomy(response, category):
    out = classify_response(response, ANSWER, haystack=HAYSTACK)
    assert out["category"] == category, out
    if category == "wrong_extraction":
        assert out["haystack_copy"] and out["copied_words"] >= 5


def test_taxonomy_details():
    out = classify_response("Eat a sandwich in Dolores Park.", ANSWER, haystack=HAYSTACK)
    assert out["content_recall"] == pytest.approx(4 / 7) and out["haystack_copy"] is None
    # the n-gram length is a parameter; 4 consecutive copied words are not enough at the default 5
    assert classify_response("to utter and to", ANSWER, haystack=HAYSTACK)["category"] == "hallucination"
    assert classify_response("to utter and to", ANSWER, haystack=HAYSTACK, ngram=4)["category"] == "wrong_extraction"

"""The recipe record: parsing of retained blocks, validation of every field, and its dict round trip."""

from __future__ import annotations

import pytest

from hif4fmt.errors import RecipeError
from hif4fmt.recipe import MAX_RETAINED_BLOCKS, Recipe, RetainedBlock


@pytest.mark.parametrize("text, expected", [
    ("transformer:0", RetainedBlock("transformer", 0)),
    ("transformer_2:39", RetainedBlock("transformer_2", 39)),
    ("transformer:999999999", RetainedBlock("transformer", 999_999_999)),
])
def test_retained_block_parses_component_and_decimal_index(text, expected):
    assert RetainedBlock.parse(text) == expected
    assert str(RetainedBlock.parse(text)) == text


@pytest.mark.parametrize("text", [
    "transformer", "transformer:", ":3", "transformer:-1", "transformer:01", " transformer:1", "transformer:1 ",
    "transformer : 1", "transformer:\u00b2", "transformer:\u0661", "transformer:1000000000", "transformer:1.0",
    "transformer:1:2", "", "foo:1", "Transformer:1",
])
def test_retained_block_rejects_anything_but_the_canonical_spelling(text):
    with pytest.raises(RecipeError, match="retained block"):
        RetainedBlock.parse(text)


def test_more_than_two_retained_blocks_raise():
    blocks = tuple(RetainedBlock("transformer", i) for i in range(MAX_RETAINED_BLOCKS + 1))
    with pytest.raises(RecipeError, match="at most 2"):
        Recipe(retained_blocks=blocks)


def test_duplicate_retained_blocks_raise():
    with pytest.raises(RecipeError, match="duplicates"):
        Recipe(retained_blocks=(RetainedBlock("transformer", 3), RetainedBlock("transformer", 3)))


def test_retained_blocks_are_sorted_so_equal_recipes_serialise_equally():
    a = Recipe(retained_blocks=(RetainedBlock("transformer_2", 1), RetainedBlock("transformer", 5)))
    b = Recipe(retained_blocks=(RetainedBlock("transformer", 5), RetainedBlock("transformer_2", 1)))
    assert a == b and a.to_dict() == b.to_dict()
    assert a.to_dict()["retained_blocks"] == ["transformer:5", "transformer_2:1"]


@pytest.mark.parametrize("fields, message", [
    ({"statistic": "mean"}, "statistic"),
    ({"percentile": 0.0}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"percentile": float("nan")}, "percentile"),
    ({"percentile": True}, "percentile"),
    ({"statistic": "max"}, "percentile must be omitted"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": float("inf")}, "alpha"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-6}, "eps"),
    ({"encoder": "nvfp4"}, "encoder"),
    ({"mask_dtype": "float64"}, "mask_dtype"),
])
def test_invalid_fields_raise_recipe_error_naming_the_field(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**fields)


@pytest.mark.parametrize("recipe", [
    Recipe(),
    Recipe(statistic="max", percentile=None, alpha=0.7, eps=1e-5, encoder="ascend", mask_dtype="bfloat16"),
    Recipe(percentile=99.0, retained_blocks=(RetainedBlock("transformer_2", 39),)),
])
def test_to_dict_from_dict_round_trip(recipe):
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_from_dict_with_a_missing_key_raises():
    data = Recipe().to_dict()
    del data["alpha"]
    with pytest.raises(RecipeError, match="missing keys"):
        Recipe.from_dict(data)

"""The record service marks the config it has just validated so that its own append does not validate it
again (services.records.validation.validated): a mark serves one check of that very object, and the
key is checked either way."""

from __future__ import annotations

import pytest

from modelbus.services.records.validation import check_model_config, validated


def test_a_mark_serves_one_check_of_that_object_only() -> None:
    bad = {"key": "k", "name": "m", "model_type": "lora", "model_format": "lycoris"}  # no base, no path
    with pytest.raises(ValueError):
        check_model_config("k", {"config": bad})
    validated(bad)
    with pytest.raises(ValueError):  # an equal copy is not the marked object
        check_model_config("k", {"config": dict(bad)})
    check_model_config("k", {"config": bad})  # the marked object: accepted once
    with pytest.raises(ValueError):
        check_model_config("k", {"config": bad})  # the mark is spent


def test_a_marked_config_still_needs_the_aggregate_key() -> None:
    config = {"key": "other", "name": "m"}
    validated(config)
    with pytest.raises(ValueError, match="is not the event's aggregate"):
        check_model_config("k", {"config": config})

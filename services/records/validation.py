"""The domain check of model events, registered with the event layer (events.validation) at import.

A ModelAdded or ModelUpdated carries the record's whole config: it must validate as a record config of
its (model_type, model_format) class, for the key of its aggregate. Every reader of the log (each
projection, rebuild, subscribers, the install job fold) and the store's append call this one function,
so an entry one of them refuses is refused by all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelbus.events.validation import register_body_check
from modelbus.services.records.models import CLASSES_BY_TAG, tag_of
from modelbus.services.records.parsing import config_class

CONFIG_EVENTS = ("ModelAdded", "ModelUpdated")


def check_model_config(aggregate_id: str, body: Mapping[str, Any]) -> None:
    """ValueError naming the problem when ``body["config"]`` is not a valid record for ``aggregate_id``."""
    config = body.get("config")
    if not isinstance(config, Mapping):
        raise ValueError("config is not an object")  # noqa: TRY004 - the hook's one error type
    # InvalidModelConfigException (a wrong type/format pair) and pydantic's ValidationError are ValueErrors;
    # the class by its tag first (a replay's inner loop), config_class for the error naming a bad pair
    cls = CLASSES_BY_TAG.get(tag_of(config.get("model_type", ""), config.get("model_format", ""))) \
        or config_class(config)
    cls.model_validate(config)
    if config.get("key") != aggregate_id:
        raise ValueError(f"config key {config.get('key')!r} is not the event's aggregate {aggregate_id!r}")


for _type in CONFIG_EVENTS:
    register_body_check(_type, check_model_config)

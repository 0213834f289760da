"""The domain check of model events, registered with the event layer (events.validation) at import.

A ModelAdded or ModelUpdated carries the record's whole config: it must validate as a record config of
its (model_type, model_format) class, for the key of its aggregate. Every reader of the log (each
projection, rebuild, subscribers, the install job fold) and the store's append call this one function,
so an entry one of them refuses is refused by all.

One exception, for the writer's own appends: a config the record service has just validated (a record's
dump, put in the event it appends) is marked with :func:`validated` and the append's check skips
validating it again (it still checks the key): the second validation was a sixth of an add's own time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelbus.events.validation import register_body_check
from modelbus.services.records.models import CLASSES_BY_TAG, tag_of
from modelbus.services.records.parsing import config_class

CONFIG_EVENTS = ("ModelAdded", "ModelUpdated")

#: configs marked by :func:`validated`, by id, until a check meets them (the dict itself is kept, so its
#: id is not reused while marked); a few only: appends that never came to their check are forgotten
_VALIDATED: dict[int, Mapping[str, Any]] = {}
_VALIDATED_MAX = 64


def validated(config: Mapping[str, Any]) -> None:
    """Mark ``config`` (an event's own dict, which a frozen event cannot replace) as a record config
    validated by the caller: the next check of that very object skips the validation."""
    if len(_VALIDATED) >= _VALIDATED_MAX:
        _VALIDATED.clear()
    _VALIDATED[id(config)] = config


def check_model_config(aggregate_id: str, body: Mapping[str, Any]) -> None:
    """ValueError naming the problem when ``body["config"]`` is not a valid record for ``aggregate_id``."""
    config = body.get("config")
    if not isinstance(config, Mapping):
        raise ValueError("config is not an object")  # noqa: TRY004 - the hook's one error type
    if _VALIDATED.pop(id(config), None) is not config:
        # InvalidModelConfigException (a wrong type/format pair) and pydantic's ValidationError are
        # ValueErrors; the class by its tag first (a replay's inner loop), config_class for the error
        # naming a bad pair
        cls = CLASSES_BY_TAG.get(tag_of(config.get("model_type", ""), config.get("model_format", ""))) \
            or config_class(config)
        cls.model_validate(config)
    if config.get("key") != aggregate_id:
        raise ValueError(f"config key {config.get('key')!r} is not the event's aggregate {aggregate_id!r}")


for _type in CONFIG_EVENTS:
    register_body_check(_type, check_model_config)

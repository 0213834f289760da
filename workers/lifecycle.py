"""The hash queue's verify and prune jobs (the API's and the CLI's ``verify`` and ``prune`` run here, never
in the API process: they read and delete model files). Each returns what the client's call returns; an
error of modelbus's own comes back as ``{"error": {"kind", "type", "message"}}`` (as workers.scan does)."""

from __future__ import annotations

from typing import Any

from modelbus.events.errors import ModelbusError
from modelbus.services.install.manifest import recorded_manifest
from modelbus.services.install.prune import prune
from modelbus.services.install.verify import verify_model
from modelbus.workers.context import current
from modelbus.workers.hash import open_records
from modelbus.workers.scan import refused


def run_verify(key: str) -> dict[str, Any]:
    context = current()
    try:
        records = open_records(context.config, context.store)
        try:
            record = records.get_model(key)
            return verify_model(context.config, record, recorded_manifest(records.history(key))).as_dict()
        finally:
            records.close()
    except ModelbusError as exc:
        return refused(exc)


def run_prune(dry_run: bool = False) -> dict[str, Any]:
    context = current()
    try:
        records = open_records(context.config, context.store)
        try:
            return prune(context.config, context.store, records, dry_run).as_dict()
        finally:
            records.close()
    except ModelbusError as exc:
        return refused(exc)

"""``modelbus store push|verify|gc``: the model store (MODELBUS_STORE_URL) seen from the command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from modelbus.services.cli.context import client, state
from modelbus.services.cli.output import console, human_bytes, print_json

if TYPE_CHECKING:
    from modelbus.services.install.manifest import Manifest
from modelbus.services.store import BlobStore, StoreConfigError, defaults, maintenance, open_store

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]


def _store() -> BlobStore:
    store = open_store(state.config())
    if store is None:
        raise StoreConfigError("no model store configured: set MODELBUS_STORE_URL=s3://bucket/prefix")
    return store


def _manifests() -> list[tuple[str, str, Manifest]]:
    from modelbus.services.install.manifest import (
        recorded_manifest,  # (the CLI's other commands never import it)
    )
    c = client()
    return [(m.key, m.path, recorded_manifest(c.history(m.key))) for m in c.list_models()]


def push(json: JsonFlag = False) -> None:
    """Upload the models of this (shared-directory) deployment to the store."""
    store, config = _store(), state.config()
    found = _manifests()
    models = [(config.model_path(path), files) for _, path, files in found if files]
    count, sent = maintenance.push(store, models)
    skipped = [key for key, _, files in found if not files]
    if json:
        print_json({"models": count, "bytes": sent, "no_manifest": skipped})
        return
    console.print(f"pushed {count} model(s) to {store.url}: {human_bytes(sent)} sent")
    if skipped:
        console.print(f"{len(skipped)} model(s) recorded before manifests were not pushed: {', '.join(skipped)}")


def verify(sample: Annotated[int | None, typer.Option(help="check this many blobs, at random")] = None,
           json: JsonFlag = False) -> None:
    """Re-hash the store's blobs and report mismatches (and referenced blobs it lacks)."""
    store = _store()
    wanted = maintenance.referenced(files for _, _, files in _manifests())
    report = maintenance.verify(store, wanted, sample)
    if json:
        print_json({"checked": report.checked, "bad": report.bad, "missing": report.missing})
    else:
        console.print(f"checked {report.checked} blob(s) in {store.url}: {len(report.bad)} bad, "
                      f"{len(report.missing)} missing")
        for digest in report.bad:
            console.print(f"  bad: {digest}")
        for digest in report.missing:
            console.print(f"  missing: {digest}")
    if report.bad or report.missing:
        raise typer.Exit(1)


def gc(dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be removed")] = False,
       grace: Annotated[float, typer.Option(help="spare unreferenced blobs younger than this (s): an "
                                            "install uploads before it records")] = defaults.GC_GRACE,
       json: JsonFlag = False) -> None:
    """Remove the blobs no record references (older than the grace period)."""
    store = _store()
    keep = maintenance.referenced(files for _, _, files in _manifests())
    report = maintenance.collect_garbage(store, keep, dry_run=dry_run, grace=grace)
    if json:
        print_json({"removed": report.removed, "bytes": report.bytes, "kept": report.kept,
                    "young": report.young, "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.removed)} blob(s) ({human_bytes(report.bytes)}) from {store.url}; "
                  f"kept {report.kept} referenced, {report.young} too recent")




"""Operational commands: events (and their quarantine), workers, doctor, records rebuild, import-yaml."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Any

import typer

from modelbus.events.workers import WorkerInfo
from modelbus.services.cli.context import client
from modelbus.services.cli.errors import CommandFailedError
from modelbus.services.cli.output import console, human_bytes, print_json, print_json_line, table
from modelbus.services.client import Delivered

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]
MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}


def _line(d: Delivered) -> str:
    event = d.event
    payload: Any = getattr(event, "payload", None)
    detail = payload if payload is not None else {k: v for k, v in event.body().items() if k != "config"}
    return f"{event.time.isoformat(timespec='milliseconds')}  {d.type:<24} {event.aggregate_id:<34} {detail}"


def events(ctx: typer.Context,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
           type_: Annotated[list[str] | None, typer.Option("--type", "-t",
                                                           help="event type or activity kind (repeatable)")] = None,
           since: Annotated[str | None, typer.Option(help="'0' (all), '$' (new), a position or a resume token")] = None,
           count: Annotated[int | None, typer.Option(help="stop after this many events")] = None,
           json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False) -> None:
    """Print events; with --follow, wait for new ones (resuming after a lost connection)."""
    if ctx.invoked_subcommand is not None:
        return
    c = client()
    types = [t for item in (type_ or []) for t in item.split(",") if t] or None
    emit = (lambda d: print_json_line(d.to_dict())) if json else (lambda d: console.print(_line(d), markup=False,
                                                                                          highlight=False))
    if not follow:
        for delivered in c.events(types=types, since=since or "0", limit=count or 1000):
            emit(delivered)
        return
    for seen, delivered in enumerate(c.subscribe(types, since or "$"), start=1):
        emit(delivered)
        if count is not None and seen >= count:
            return


def quarantine(json: JsonFlag = False) -> None:
    """List the log entries every reader refused and skipped (never applied), oldest refusal first."""
    found = client().quarantined()
    if json:
        print_json([dataclasses.asdict(q) for q in found])
        return
    table(f"{len(found)} quarantined entr{'y' if len(found) == 1 else 'ies'}",
          ("position", "type", "aggregate", "version", "refused at", "reason"),
          ((q.position, q.type, q.aggregate_id, q.aggregate_version, q.time, q.reason) for q in found))


def workers(json: JsonFlag = False,
            all_: Annotated[bool, typer.Option("--all", help="include workers whose heartbeat stopped")] = False,
            ) -> None:
    """List the workers with their queues, device and cache contents."""
    found = client().workers(include_dead=all_)
    if json:
        print_json([w.model_dump(mode="json") for w in found])
        return
    now = time.time()
    table(f"{len(found)} worker(s)", ("id", "alive", "queues", "device", "cached models", "last beat"),
          ((w.id, "yes" if w.alive else "no", ",".join(w.queues), w.device or "", _cache(w),
            f"{now - w.last_heartbeat:.0f}s ago") for w in found))


def _cache(worker: WorkerInfo) -> str:
    if not worker.models:
        return "-"
    partial = [m for m in worker.models if m.tier == "partial"]
    streamed = "".join(f", {m.key} {m.resident_bytes / max(m.bytes, 1):.0%} resident" for m in partial)
    return f"{len(worker.models)} ({human_bytes(worker.cached_bytes)}{streamed})"


def doctor(json: JsonFlag = False) -> None:
    """Check Redis (reachable, persistence, eviction), workers, disk space and the GPU."""
    # imported here: its store and config checks import what no other command needs
    from modelbus.services.cli.doctor import run_checks
    checks = run_checks(client())
    if json:
        print_json([dataclasses.asdict(c) for c in checks])
    else:
        for check in checks:
            console.print(f"{MARK[check.status]} {check.name:<16} {check.detail}", highlight=False)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        raise CommandFailedError(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")


def records_rebuild(json: JsonFlag = False) -> None:
    """Throw the record projection away and replay the whole event log into it."""
    report = client().rebuild_records()
    if json:
        print_json(dataclasses.asdict(report))
        return
    console.print(f"rebuilt {report.store} at {report.location}: {report.models} model(s) up to "
                  f"{report.checkpoint} in {report.seconds:.2f}s")


def import_yaml(path: Annotated[str, typer.Argument(help="a legacy models.yaml")], json: JsonFlag = False) -> None:
    """Import the models of a legacy models.yaml into the records."""
    report = client().import_yaml(path)
    if json:
        print_json({"source": str(report.source), "imported": report.imported, "skipped": report.skipped,
                    "notes": report.notes})
    else:
        console.print(f"imported {len(report.imported)} model(s) from {report.source}")
        for entry, why in report.skipped:
            console.print(f"  skipped {entry}: {why}", markup=False)
    if report.skipped:
        raise CommandFailedError(f"{len(report.skipped)} entr{'y' if len(report.skipped) == 1 else 'ies'} not imported")

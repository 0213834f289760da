"""Lifecycle commands: jobs pause|resume|restart, verify, prune, ls-remote."""

from __future__ import annotations

from typing import Annotated

import typer

from modelbus.services.cli.context import client
from modelbus.services.cli.output import console, print_json

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]
JobArg = Annotated[str, typer.Argument(help="the install job's id")]


def _job_line(job: dict[str, object], did: str) -> None:
    console.print(f"install job {job['id']} {did}: {job['state']}")


def pause(job_id: JobArg, json: JsonFlag = False) -> None:
    """Pause a waiting or downloading install job; its partial files stay for the resume."""
    job = client().pause(job_id)
    print_json(job) if json else _job_line(job, "paused")


def resume(job_id: JobArg, json: JsonFlag = False) -> None:
    """Resume a paused install job: its downloads continue where they stopped."""
    job = client().resume(job_id)
    print_json(job) if json else _job_line(job, "resumed")


def restart(job_id: JobArg, json: JsonFlag = False) -> None:
    """Run a failed or cancelled install job again from the start."""
    job = client().restart(job_id)
    print_json(job) if json else _job_line(job, "restarted")

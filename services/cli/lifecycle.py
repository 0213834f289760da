"""Lifecycle commands: jobs pause|resume|restart, verify, prune, ls-remote."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from modelbus.events.jobs import InstallJobView
from modelbus.services.cli.context import client
from modelbus.services.cli.errors import CommandFailedError
from modelbus.services.cli.output import console, err_console, human_bytes, print_json, table

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]
JobArg = Annotated[str, typer.Argument(help="the install job's id")]


def _job_line(job: InstallJobView, did: str) -> None:
    console.print(f"install job {job.id} {did}: {job.state}")


def pause(job_id: JobArg, json: JsonFlag = False) -> None:
    """Pause a waiting or downloading install job; its partial files stay for the resume."""
    job = client().pause(job_id)
    print_json(job) if json else _job_line(job, "paused")


def resume(job_id: JobArg, json: JsonFlag = False) -> None:
    """Resume a paused install job: its downloads continue where they stopped."""
    job = client().resume(job_id)
    print_json(job) if json else _job_line(job, "resumed")


def restart(job_id: JobArg,
            from_scratch: Annotated[bool, typer.Option("--from-scratch", help="download every file again (by "
                                                       "default the files a failed repo install downloaded whole "
                                                       "and verified are kept)")] = False,
            json: JsonFlag = False) -> None:
    """Run a failed or cancelled install job again: only its failed and missing files are downloaded."""
    job = client().restart(job_id, from_scratch=from_scratch)
    if json:
        print_json(job)
        return
    kept = f"; {len(job.kept_files)} downloaded file(s) kept" if job.kept_files else ""
    console.print(f"install job {job.id} restarted: {job.state}{kept}")


def _details(report: dict[str, Any]) -> str:
    parts = [f"{what}: {', '.join(report.get(what) or [])}" for what in ("missing", "changed", "busy", "extra")
             if report.get(what)]
    if report.get("error"):
        parts.append(str(report["error"]))
    repair = report.get("repair")
    if repair:
        parts.append(f"repair {repair['state']}" + (f" ({repair['error']})" if repair.get("error") else ""))
    return "; ".join(parts)


def verify(keys: Annotated[list[str] | None, typer.Argument(help="keys, key prefixes or names (default: all)")] = None,
           repair: Annotated[bool, typer.Option(help="download missing or changed models again from their "
                                                     "recorded source")] = False,
           timeout: Annotated[float | None, typer.Option(help="seconds to wait for the workers")] = None,
           json: JsonFlag = False) -> None:
    """Re-hash installed files against the recorded hashes (on the hash workers, in parallel)."""
    c = client()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("verifying", total=None)

        def heard(done: int, total: int, report: dict[str, Any]) -> None:
            progress.update(task, completed=done, total=total, description=f"verified {report['key']}")
        result = c.verify(keys or [], repair=repair, on_progress=heard, timeout=timeout)
    if json:
        print_json(result)
    else:
        table(f"{len(result['models'])} model(s) verified", ("key", "name", "status", "details"),
              ((m["key"], m["name"], m["status"], _details(m)) for m in result["models"]))
    if not result["healthy"]:
        bad = [f"{m['key']} {m['status']}" for m in result["models"] if m["status"] != "ok"]
        raise CommandFailedError(f"{len(bad)} model(s) not as recorded: {', '.join(bad[:10])}"
                                 + (" (busy: being written; verify again when done)" if
                                    any(m["status"] == "busy" for m in result["models"]) else ""))


def prune(dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted")] = False,
          timeout: Annotated[float | None, typer.Option(help="seconds to wait for the worker")] = None,
          json: JsonFlag = False) -> None:
    """Delete files in the models directory that no record owns, and empty folders; reclaim staging folders
    older than MODELBUS_STAGING_TTL that no running job uses."""
    report = client().prune(dry_run=dry_run, timeout=timeout)
    if json:
        print_json(report)
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(report['files'])} file(s) ({human_bytes(report['bytes'])}) and "
                  f"{len(report['folders'])} empty folder(s)")
    for path in report["files"]:
        console.print(f"  {path}", markup=False, highlight=False)
    for path in report["folders"]:
        console.print(f"  {path}/", markup=False, highlight=False)
    console.print(staging_line(report["staging"], dry_run), markup=False, highlight=False)
    for name in report["staging"]["reclaimable"] if dry_run else report["staging"]["reclaimed"]:
        console.print(f"  .staging/{name}/", markup=False, highlight=False)


def staging_line(staging: dict[str, Any], dry_run: bool = True) -> str:
    """One line of staging figures: folders, bytes, the oldest, what the janitor reclaims."""
    line = f"staging: {staging['count']} folder(s), {human_bytes(staging['bytes'])}"
    if staging["oldest"]:
        line += f", oldest changed {staging['oldest'][:19].replace('T', ' ')} UTC"
    done = staging["reclaimable"] if dry_run else staging["reclaimed"]
    size = staging["reclaimable_bytes"] if dry_run else staging["reclaimed_bytes"]
    verb = "would reclaim" if dry_run else "reclaimed"
    return line + f"; {verb} {len(done)} ({human_bytes(size)}) older than {human_duration(staging['ttl'])} " \
                  "that no running job uses"


def human_duration(seconds: float) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def ls_remote(source: Annotated[str, typer.Argument(help="owner/repo[:subfolder] or civitai:MODEL[@VERSION]")],
              revision: Annotated[str | None, typer.Option(help="Hugging Face branch, tag or commit")] = None,
              json: JsonFlag = False) -> None:
    """List the files of a Hugging Face repo (sizes; * marks what an install takes) or a Civitai model's versions."""
    found = client().ls_remote(source, revision=revision)
    if json:
        print_json(found)
        return
    if found["kind"] == "huggingface":
        where = found["repo_id"] + (f":{found['subfolder']}" if found["subfolder"] else "")
        table(f"{where}@{found['revision']} ({found['commit'][:12]}): {len(found['files'])} file(s), "
              f"{human_bytes(found['total_bytes'])}; an install takes {human_bytes(found['chosen_bytes'])}",
              ("file", "size", "install"),
              ((f["path"], _size(f["size"]), "*" if f["chosen"] else "") for f in found["files"]))
        return
    table(f"civitai:{found['model_id']} {found['name']} ({found['type']})",
          ("version", "name", "base", "published", "file", "size", "install"),
          ((v["id"], v["name"], v["base_model"], v["published_at"] or "", f["name"], _size(f["size"]),
            "*" if v["chosen"] and f["chosen"] else "")
           for v in found["versions"] for f in v["files"]))


def _size(size: int | None) -> str:
    return "unknown" if size is None else human_bytes(size)

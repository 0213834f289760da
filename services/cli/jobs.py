"""Install commands: install, jobs, cancel, scan, sync."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from modelbus.services.cli.context import client
from modelbus.services.cli.errors import CommandFailedError, UsageError
from modelbus.services.cli.output import console, err_console, human_bytes, print_json, table

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]


def install(source: Annotated[str | None, typer.Argument(
                help="a path, URL, Hugging Face repo id or civitai:ID")] = None,
            wait: Annotated[bool, typer.Option(help="follow the job with progress bars until it ends")] = False,
            name: Annotated[str | None, typer.Option(help="the record's name")] = None,
            description: Annotated[str | None, typer.Option(help="the record's description")] = None,
            inplace: Annotated[bool, typer.Option(help="register a local path where it is")] = False,
            force: Annotated[bool, typer.Option(help="install again content already installed")] = False,
            revision: Annotated[str | None, typer.Option(help="Hugging Face revision")] = None,
            variant: Annotated[str | None, typer.Option(help="diffusers variant, e.g. fp16")] = None,
            timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many seconds")] = None,
            sha256: Annotated[str | None, typer.Option(help="a URL download's expected SHA-256 (else it fails)")] = None,
            blake3: Annotated[str | None, typer.Option(help="a URL download's expected BLAKE3 (else it fails)")] = None,
            include: Annotated[list[str] | None, typer.Option(help="Hugging Face: only files matching this glob "
                                                                   "(repeatable)")] = None,
            exclude: Annotated[list[str] | None, typer.Option(help="Hugging Face: leave out files matching this "
                                                                   "glob (repeatable)")] = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be downloaded and where; "
                                                                    "install nothing")] = False,
            json: JsonFlag = False,
            starter: Annotated[list[str] | None, typer.Option(help="a starter model (repeatable): `modelbus starters`")]
            = None,
            bundle: Annotated[str | None, typer.Option(help="a bundle of starter models: sd-1, sdxl, flux")] = None,
            ) -> None:
    """Install a model: publish the command, and with --wait follow it to the end."""
    from modelbus.services.cli.modeldata import install_starters  # (rich.progress: not for `jobs`)
    from modelbus.services.cli.progress import follow_install, head
    if starter or bundle:
        install_starters(source, starter or [], bundle, wait=wait, timeout=timeout, json=json)
        return
    if source is None:
        raise UsageError("install needs a SOURCE (or --starter NAME / --bundle NAME)")
    c = client()
    config = {k: v for k, v in (("name", name), ("description", description)) if v is not None}
    options: dict[str, Any] = {"inplace": inplace, "force": force}
    options.update({k: v for k, v in (("revision", revision), ("variant", variant), ("sha256", sha256),
                                      ("blake3", blake3)) if v is not None})
    options.update({k: v for k, v in (("include", include), ("exclude", exclude)) if v})
    if dry_run:
        show_plan(c.plan_install(source, **options), json)
        return
    since = head(c) if wait else "$"
    job = c.install(source, config=config, **options)
    if wait:
        job = follow_install(c, job, since, err_console, timeout)  # stdout stays for the result
    if json:
        print_json(job.model_dump(mode="json"))
    elif not wait:
        console.print(f"install job {job.id} {job.state} (follow it: modelbus jobs)")
    if job.state == "completed":
        if not json:
            console.print(f"{job.source}: already installed as {job.key}" if job.already_installed
                          else f"installed {job.source} as {job.key}")
    elif wait:
        raise CommandFailedError(f"install of {job.source} {job.state}: {job.error or 'no reason given'}")


def show_plan(plan: dict[str, Any], json: bool) -> None:
    if json:
        print_json(plan)
        return
    table(f"{plan['source']}: {len(plan['files'])} file(s), {human_bytes(plan['total_bytes'])} (dry run: "
          "nothing downloaded)", ("file", "size"),
          ((f["path"], human_bytes(f["size"]) if f["size"] is not None else "unknown") for f in plan["files"]))
    console.print(f"would install into {plan['destination']}", markup=False, highlight=False)


def jobs(ctx: typer.Context, json: JsonFlag = False) -> None:
    """List install jobs."""
    if ctx.invoked_subcommand is not None:
        return
    found = client().jobs()
    if json:
        print_json([j.model_dump(mode="json") for j in found])
        return
    table(f"{len(found)} install job(s)", ("id", "state", "source", "progress", "key / error"),
          ((j.id, j.state, j.source, f"{human_bytes(j.bytes)} / {human_bytes(j.total_bytes)}",
            j.key or j.error or "") for j in found))


def cancel(job_id: str) -> None:
    """Cancel an install job."""
    job = client().cancel(job_id)
    console.print(f"install job {job_id}: {job.state}")


def scan(path: str, json: JsonFlag = False) -> None:
    """Register every model found under a folder, where it is."""
    result = client().scan(path)
    if json:
        print_json(result.model_dump(mode="json"))
        return
    console.print(f"registered {len(result.added)} model(s)" + (": " + ", ".join(result.added) if result.added else ""))


def sync(json: JsonFlag = False) -> None:
    """Reconcile the records with the models directory."""
    report = client().sync()
    if json:
        print_json(report.model_dump(mode="json"))
        return
    console.print(f"added {len(report.added)}, missing files {len(report.missing)}, skipped {len(report.skipped)}")
    for key in report.missing:
        console.print(f"  missing: {key}")
    for path, why in report.skipped.items():
        console.print(f"  skipped {path}: {why}")

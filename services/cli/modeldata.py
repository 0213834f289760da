"""Per-model data commands: settings (defaults and trigger phrases), link/unlink/links, cover set|get|rm."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelbus.services.cli.context import client
from modelbus.services.cli.errors import CommandFailedError, UsageError
from modelbus.services.cli.output import console, err_console, human_bytes, print_json, table
from modelbus.services.cli.progress import follow_install, head

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _show_data(model: Any, json: bool) -> None:
    data = model.model_dump(mode="json")
    if json:
        print_json(data)
        return
    rows = [(k, data[k]) for k in ("default_settings", "trigger_phrases", "links", "cover") if data.get(k)]
    table(f"{data['name']} ({data['key']})", ("field", "value"), rows or [("(per-model data)", "none")])


def settings(key: str,
             vae: Annotated[str | None, typer.Option(help="key of the VAE to use")] = None,
             scheduler: Annotated[str | None, typer.Option(help="scheduler name, e.g. euler_a, dpmpp_2m_k")] = None,
             steps: Annotated[int | None, typer.Option(help="denoising steps (1-1000)")] = None,
             cfg_scale: Annotated[float | None, typer.Option(help="CFG scale (1-100)")] = None,
             width: Annotated[int | None, typer.Option(help="width in pixels (multiple of 8)")] = None,
             height: Annotated[int | None, typer.Option(help="height in pixels (multiple of 8)")] = None,
             clip_skip: Annotated[int | None, typer.Option(help="CLIP layers to skip (0-12)")] = None,
             guidance: Annotated[float | None, typer.Option(help="FLUX guidance")] = None,
             clear: Annotated[list[str] | None, typer.Option(help="a setting to clear (repeatable)")] = None,
             trigger: Annotated[list[str] | None, typer.Option(
                 help="a trigger phrase (repeatable; the list replaces the old one)")] = None,
             no_triggers: Annotated[bool, typer.Option("--no-triggers", help="remove every trigger phrase")] = False,
             json: JsonFlag = False) -> None:
    """Show or change a model's default settings (main models) and trigger phrases (LoRAs, embeddings)."""
    given = {"vae": vae, "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale, "width": width,
             "height": height, "clip_skip": clip_skip, "guidance": guidance}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for field in clear or ():
        if field in changes:
            raise UsageError(f"--clear {field} and --{field.replace('_', '-')} together")
        changes[field] = None
    if no_triggers and trigger:
        raise UsageError("--trigger and --no-triggers together")
    phrases = [] if no_triggers else trigger
    if not changes and phrases is None:
        _show_data(client().get_model(key), json)
        return
    _show_data(client().set_settings(key, changes or None, phrases), json)


def link(key: str, target: str, relation: Annotated[str | None, typer.Option(
        help="for (a LoRA, VAE... made for TARGET) or uses (a pipeline using TARGET); default by KEY's type")] = None,
         ) -> None:
    """Link a model to another one (which must exist)."""
    model = client().link(key, target, relation)
    rel = next(link.relation for link in model.links if link.key == target)
    console.print(f"linked {key} ({rel}) {target}")


def unlink(key: str, target: str) -> None:
    """Remove a link."""
    client().unlink(key, target)
    console.print(f"unlinked {key} from {target}")


def links(key: str, json: JsonFlag = False) -> None:
    """A model's links, both sides: the models it links to and those linking to it."""
    found = client().links(key)
    if json:
        print_json(found)
        return
    rows = [("->", link["relation"], link["key"]) for link in found["links"]]
    rows += [("<-", link["relation"], link["key"]) for link in found["linked_from"]]
    table(f"links of {key}", ("", "relation", "model"), rows)


def cover_set(key: str, image: Annotated[Path, typer.Argument(help="a PNG, JPEG or WebP file")]) -> None:
    """Make an image the model's cover (stored as a WebP thumbnail)."""
    model = client().set_cover(key, image)
    cover = model.cover
    assert cover is not None
    console.print(f"cover of {key}: {cover.width}x{cover.height} WebP, {cover.bytes} bytes")


def cover_get(key: str, output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="write it here (default: stdout)")] = None) -> None:
    """Write the model's cover (WebP) to a file or stdout."""
    data = client().get_cover(key)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    output.write_bytes(data)
    console.print(f"wrote {output} ({len(data)} bytes)")


def cover_rm(key: str) -> None:
    """Remove the model's cover."""
    client().delete_cover(key)
    console.print(f"removed the cover of {key}")


def starters(json: JsonFlag = False) -> None:
    """The starter models (and bundles) modelbus knows, with the key of each one installed."""
    found = client().starters()
    if json:
        print_json(found)
        return
    table(f"{len(found['models'])} starter model(s)", ("name", "type", "base", "size", "installed", "needs", "source"),
          ((s["name"], s["type"], s["base"], human_bytes(s["size"]), s["installed"] or "",
            ", ".join(s["dependencies"]) + (" (gated: HF_TOKEN)" if s["gated"] else ""), s["source"])
           for s in found["models"]))
    table("bundles (install --bundle NAME)", ("bundle", "models", "description"),
          ((b["name"], ", ".join(b["models"]), b["description"]) for b in found["bundles"]))


def install_starters(source: str | None, names: list[str], bundle: str | None, *, wait: bool,
                     timeout: float | None, json: bool) -> None:
    """``install --starter NAME`` / ``--bundle NAME``: each starter with its dependencies."""
    if source is not None:
        raise UsageError("give a SOURCE or --starter/--bundle, not both")
    c = client()
    since = head(c) if wait else "$"
    started = c.install_starters(names, bundle)
    failed = []
    for entry in started:
        if "job" in entry and wait:
            entry["job"] = follow_install(c, entry["job"], since, err_console, timeout)
            if entry["job"]["state"] != "completed":
                failed.append(f"{entry['starter']}: {entry['job']['state']} ({entry['job'].get('error')})")
    if json:
        print_json(started)
    else:
        for entry in started:
            job = entry.get("job")
            what = f"already installed as {entry['installed']}" if job is None else \
                f"job {job['id']} {job['state']}" + (f" as {job['key']}" if job.get("key") else "")
            console.print(f"{entry['starter']}: {what}")
    if failed:
        raise CommandFailedError("starters not installed: " + "; ".join(failed))


def convert(key: str, keep_original: Annotated[bool, typer.Option(
        "--keep-original", help="keep the single file (it is no longer the record's)")] = False,
            timeout: Annotated[float | None, typer.Option(help="give up waiting after this many seconds")] = None,
            json: JsonFlag = False) -> None:
    """Convert a single-file main checkpoint into a diffusers folder, on a worker of the hash queue."""
    result = client().convert(key, keep_original=keep_original, timeout=timeout)
    if json:
        print_json(result)
        return
    kept = "removed" if result["original_removed"] else "kept"
    console.print(f"converted {key} to {result['path']} (hash {result['hash']}); the original file is {kept}")
    for part, companion in sorted(result.get("companions", {}).items()):
        console.print(f"  {part} from {companion}", markup=False, highlight=False)

"""Record commands: list, show, rm, rename, update, history, load, unload."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer

from modelbus.services.cli.context import client
from modelbus.services.cli.errors import UsageError
from modelbus.services.cli.output import console, err_console, human_bytes, print_json, table

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def list_models(name: Annotated[str | None, typer.Option(help="exact model name")] = None,
                base: Annotated[str | None, typer.Option(help="base model, e.g. sd-1, sdxl")] = None,
                type: Annotated[str | None, typer.Option("--type", help="model type, e.g. main, lora, vae")] = None,
                tag: Annotated[list[str] | None, typer.Option(help="models carrying this tag (repeatable)")] = None,
                sort: Annotated[str, typer.Option(
                    help="sort by name, type, base, format, size, added or modified")] = "name",
                desc: Annotated[bool, typer.Option("--desc", help="descending order")] = False,
                json: JsonFlag = False,
                format: Annotated[str | None, typer.Option("--format", help="model format, e.g. gguf")] = None,
                quantization: Annotated[str | None, typer.Option(help="quantization, e.g. Q4_K, nf4")] = None,
                ) -> None:
    """List the installed models."""
    models = client().list_models(name=name, base=base, type=type, tag=tag, order_by=sort,
                                  direction="desc" if desc else "asc", format=format, quantization=quantization)
    if json:
        print_json([m.model_dump(mode="json") for m in models])
        return
    sizes = {k: v.size for k, v in client().listing(m.key for m in models).items()}
    table(f"{len(models)} model(s)", ("key", "name", "type", "format", "base", "size", "path"),
          ((m.key, m.name, m.model_type.value, m.model_format.value, m.base_model.value,
            human_bytes(sizes[m.key]) if sizes.get(m.key) else "", m.path) for m in models))


def show(key: Annotated[str | None, typer.Argument(help="a key, a unique start of a key, or a unique name")] = None,
         hash: Annotated[str | None, typer.Option("--hash", help="find by content hash: blake3:<hex>")] = None,
         json: JsonFlag = False) -> None:
    """Show one model's record (by key, key prefix or name; --hash: every model with that content)."""
    if (key is None) == (hash is None):
        raise UsageError("show takes a key (or its start, or a name) or --hash blake3:<hex>, not both")
    models = client().models_by_hash(hash) if hash is not None else [client().find_model(str(key))]
    found = [m.model_dump(mode="json") for m in models]
    for data in found:
        data["linked_from"] = client().links(data["key"])["linked_from"]  # links are shown on both sides
    if json:
        print_json(found if hash is not None else found[0])
        return
    for data in found:
        table(data["name"], ("field", "value"), ((k, v) for k, v in data.items() if v not in (None, [], "")))


def rm(key: str, delete_files: Annotated[bool, typer.Option(
        help="also delete the files recorded at its install (never another model's)")] = False) -> None:
    """Remove a model's record (and, with --delete-files, its files)."""
    model = client().delete_model(key, delete_files=delete_files)
    console.print(f"removed {model.name} ({key})" + (" and its files" if delete_files else ""))


def rename(key: str, new_name: str) -> None:
    """Rename a model."""
    model = client().rename_model(key, new_name)
    console.print(f"renamed {key} to {model.name}")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``field=value``; the value is read as JSON when it is JSON (numbers, lists, null), else as text."""
    field, sep, raw = text.partition("=")
    if not sep or not field.strip():
        raise UsageError(f"--set expects field=value, got {text!r}")
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return field.strip(), value


def update(key: str, set_: Annotated[list[str], typer.Option("--set", help="field=value (repeatable)")],
           json: JsonFlag = False) -> None:
    """Change fields of a model's record: --set description="..." --set tags='["a","b"]'."""
    changes = dict(parse_assignment(s) for s in set_)
    if not changes:
        raise UsageError("nothing to update: give at least one --set field=value")
    model = client().update_model(key, changes)
    if json:
        print_json(model.model_dump(mode="json"))
    else:
        console.print(f"updated {key}: " + ", ".join(sorted(changes)))


def history(key: str, json: JsonFlag = False) -> None:
    """Every event of one model, oldest first."""
    events = client().history(key)
    if json:
        print_json([{"position": s.position, **s.event.model_dump(mode="json")} for s in events])
        return
    table(f"history of {key}", ("position", "time", "event", "details"),
          ((s.position, s.event.time.isoformat(timespec="seconds"), s.event.type, _summary(s.event.body()))
           for s in events))


def _summary(body: dict[str, Any]) -> str:
    body = {k: v for k, v in body.items() if k != "config"}
    return orjson.dumps(body).decode()[:120]


def load(key: str, submodel: Annotated[str | None, typer.Option(help="part of a main model, e.g. unet, transformer (FLUX, SD-3), vae, text_encoder")] = None,
         worker: Annotated[str | None, typer.Option(help="a GPU worker id (default: the one holding it)")] = None,
         timeout: Annotated[float, typer.Option(help="seconds to wait for the worker")] = 600.0,
         json: JsonFlag = False) -> None:
    """Load a model into a GPU worker's cache and wait for model_load_completed."""
    c = client()
    from modelbus.services.cli.progress import LoadStatus  # rich.progress: only for a load
    result = LoadStatus(c, key, err_console).run(lambda: c.load(key, submodel=submodel, worker=worker, timeout=timeout))
    if json:
        print_json(result.model_dump(mode="json"))
        return
    seconds = result.seconds
    console.print(f"loaded {key}{'/' + submodel if submodel else ''} on {result.worker} "
                  f"({result.device}, {result.precision})" + (f" in {seconds:.2f}s" if seconds is not None else ""))


def unload(key: str, worker: Annotated[str | None, typer.Option(help="only this GPU worker")] = None) -> None:
    """Drop a model from the GPU workers' caches."""
    result = client().unload(key, worker=worker)
    workers = ", ".join(w for w in result.workers if w) or "no worker held it"
    console.print(f"{key}: {result.state} ({workers})")

"""Keeping what is installed healthy, for the client: verify (one job per model on the hash workers, in
parallel; ``repair`` downloads broken models again from their sources) and prune (on a hash worker).

The client process itself never reads or deletes a model file here: the API sits on this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from modelbus.events.errors import ModelbusError
from modelbus.services.client import on_worker

# services.client.core.ModelBusClient, which calls into this module (typed loosely: no import circle)
ModelBusClient: TypeAlias = Any

Progress = Callable[[int, int, dict[str, Any]], None]  # (done, total, the model's report)
PROBLEMS = ("missing", "changed", "busy", "error")


def _report(key: str, name: str, answer: dict[str, Any]) -> dict[str, Any]:
    error = answer.get("error")
    if isinstance(error, dict):  # the worker refused this model (a forged manifest...): named, not a crash
        return {"key": key, "name": name, "status": "error", "error": str(error.get("message")), "missing": [],
                "changed": [], "busy": [], "extra": []}
    return answer


def _summary(models: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: 0 for status in ("ok", *PROBLEMS)}
    for m in models:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    return {"models": models, "summary": counts, "healthy": not any(counts[p] for p in PROBLEMS)}


def verify(client: ModelBusClient, refs: Sequence[str] = (), *, repair: bool = False,
           on_progress: Progress | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Check every model (or those ``refs`` name: keys, key prefixes, names) against its recorded files."""
    models = [client.find_model(r) for r in refs] if refs else client.list_models()
    models = list({m.key: m for m in models}.values())
    reports = _verify_keys(client, [(m.key, m.name) for m in models], on_progress, timeout)
    if repair:
        broken = [r for r in reports if r["missing"] or r["changed"]]
        for report in broken:
            report["repair"] = _repair(client, report["key"], timeout)
        redo = [r for r in broken if r["repair"].get("state") == "completed"]
        again = {r["key"]: r for r in _verify_keys(client, [(r["key"], r["name"]) for r in redo], None, timeout)}
        reports = [{**again[r["key"]], "repair": r["repair"]} if r["key"] in again else r for r in reports]
    return _summary(reports)


def _verify_keys(client: ModelBusClient, keys: list[tuple[str, str]], on_progress: Progress | None,
                 timeout: float | None) -> list[dict[str, Any]]:
    if not keys:
        return []
    done = [0]

    def heard(index: int, answer: dict[str, Any]) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], len(keys), _report(*keys[index], answer))

    answers = on_worker.run_each_on_worker(client.redis, client.store.keys, on_worker.VERIFY_FUNCTION,
                                           [(key,) for key, _ in keys], timeout, heard, refusals=False)
    return [_report(key, name, answer) for (key, name), answer in zip(keys, answers, strict=True)]


def _repair(client: ModelBusClient, key: str, timeout: float | None) -> dict[str, Any]:
    """Download the model again from its source (an install job that only puts back its broken files)."""
    from modelbus.services.install.repair import repair_source  # (the install service, on first use)
    try:
        source, options = client._locked(lambda r: repair_source(client.config, client.store, r, r.get_model(key)))
        job = client.install(source, hand_over=False, repair=key, **options)
        if job["options"].get("repair") != key:
            return {"job": job["id"], "state": "skipped",
                    "error": f"{source} is being installed by job {job['id']} now: verify again when it ends"}
        done = client.wait(job, timeout)
    except ModelbusError as exc:
        return {"job": None, "state": "skipped", "error": str(exc)}
    return {"job": done["id"], "state": done["state"], "error": done.get("error")}


def prune(client: ModelBusClient, *, dry_run: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """Delete (``dry_run``: list) the files in the models directory no record owns, and empty folders."""
    answer = on_worker.run_each_on_worker(client.redis, client.store.keys, on_worker.PRUNE_FUNCTION,
                                          [(dry_run,)], timeout)[0]
    return answer


# --- browsing before an install (asks the Hugging Face / Civitai APIs from this process) ------------

def _http(client: ModelBusClient) -> Callable[[], Any]:
    import httpx

    from modelbus.services.download.network import download_client
    config = client.config
    return lambda: download_client(allow_private=config.allow_private_downloads, proxy=config.download_proxy,
                                   timeout=httpx.Timeout(15.0, read=config.download_stall_timeout),
                                   headers={"User-Agent": "modelbus-browse/0.1"}, hf_endpoint=config.hf_endpoint)


def ls_remote(client: ModelBusClient, source: str, revision: str | None = None,
              access_token: str | None = None) -> dict[str, Any]:
    from modelbus.services.client.errors import translated
    from modelbus.services.install.browse import ls_remote as listing
    with translated():
        return listing(source, client.config, _http(client), revision, access_token)


def plan_install(client: ModelBusClient, source: str, *, hand_over: bool = True, access_token: str | None = None,
                 **options: Any) -> dict[str, Any]:
    """What ``install(source, **options)`` would download and where (nothing is downloaded or queued)."""
    from modelbus.services.client.errors import translated
    from modelbus.services.install.browse import plan
    from modelbus.services.install.commands import check_command_options
    with translated():
        check_command_options(source, client.config, options, roots=not hand_over)
        return plan(source, client.config, options, _http(client), access_token, roots=not hand_over)

"""The page in a real browser (Debian's chromium), over a real API, Redis and worker processes: install
with live progress, edit and history, delete, workers with a live load, errors where they happen."""

from __future__ import annotations

import re
import signal
import uuid
from pathlib import Path

import pytest

from modelbus.services.api.ui.pages import _human_bytes
from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus
from tests.ui.conftest import add_record, ready, shoot, start_gpu_worker
from tests.waiting import wait_until

expect = pytest.importorskip("playwright.sync_api").expect


def test_install_through_the_page_shows_progress_then_the_model_in_the_table(
        page, ui_api: str, ui_bus: Bus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = f"page-lora-{uuid.uuid4().hex[:6]}"
    url = ui_bus.files.add_file(f"files/{name}.safetensors", make_lora_kohya(tmp_path / f"{name}.safetensors"))
    ready(page, f"{ui_api}/ui/install")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")  # following before the job starts
    page.fill("#source", url)
    page.fill("input[name=name]", name)
    page.keyboard.press("Enter")  # keyboard: the form submits from its fields
    card = page.locator("#install-jobs .job")
    expect(card.locator(".job-files tbody tr")).to_have_count(1)  # a file row from install_progress events
    size = (tmp_path / f"{name}.safetensors").stat().st_size
    shown = _human_bytes(size)  # the file's last progress event: all of its bytes
    expect(card.locator(".job-files tbody tr td").nth(1)).to_have_text(f"{shown} / {shown}")
    expect(card).to_have_attribute("data-state", "completed")
    link = card.locator(".job-done a")
    expect(link).to_contain_text(name)
    expect(card.locator(".job-bar")).to_have_js_property("position", 1)
    shoot(page, "install")
    link.click()
    expect(page.locator("#model-name")).to_have_text(name)
    page.goto(f"{ui_api}/ui?name={name}")
    expect(page.locator("#models-table tbody tr")).to_have_count(1)
    row = page.locator("#models-table tbody tr").first
    expect(row.locator(".badge.type")).to_have_text("lora")
    expect(row.locator(".badge.base")).to_have_text("sd-1")
    expect(row.locator("td.size")).to_have_text(shown)  # its manifest's bytes


def test_an_edited_field_shows_in_the_history_and_the_record_as_it_was(
        page, ui_api: str, ui_client: ModelBusClient) -> None:  # type: ignore[no-untyped-def]
    key = add_record(ui_client, f"edit-me-{uuid.uuid4().hex[:6]}", description="first words")
    ready(page, f"{ui_api}/ui/models/{key}")
    field = page.locator('.field[data-field="description"]')
    field.locator("button.edit").click()
    editor = field.locator("textarea")
    expect(editor).to_be_focused()
    editor.fill("better words")
    field.locator("button[type=submit]").click()
    expect(page.locator('.field[data-field="description"] .value')).to_have_text("better words")
    newest = page.locator("#timeline li").first
    expect(newest).to_have_attribute("data-type", "ModelUpdated")
    expect(newest.locator(".change")).to_contain_text("description")
    expect(newest.locator(".change")).to_contain_text("better words")
    assert ui_client.get_model(key).description == "better words"
    # the record as of the first event: the old description
    page.locator('#timeline li[data-type="ModelAdded"] button.as-of').click()
    expect(page.locator("#as-of")).to_contain_text("first words")
    expect(page.locator("#as-of")).not_to_contain_text("better words")
    shoot(page, "model")


def test_a_bad_edit_is_shown_beside_its_field_and_keeps_what_was_typed(
        page, ui_api: str, ui_client: ModelBusClient) -> None:  # type: ignore[no-untyped-def]
    key = add_record(ui_client, "bad-edit")
    ready(page, f"{ui_api}/ui/models/{key}")
    field = page.locator('.field[data-field="compatible_bases"]')
    field.locator("button.edit").click()
    field.locator("input[name=value]").fill("sd-9")
    field.locator("input[name=value]").press("Enter")
    error = field.locator(".field-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("sd-9")
    expect(field.locator("input[name=value]")).to_have_value("sd-9")
    name = page.locator('.field[data-field="name"]')
    name.locator("button.edit").click()
    name.locator("input[name=value]").fill("")
    name.locator("button[type=submit]").click()
    expect(name.locator(".field-error")).to_contain_text("at least 1 character")
    assert ui_client.get_model(key).name == "bad-edit" and ui_client.get_model(key).compatible_bases == []


def test_delete_a_model_with_its_files(page, ui_api: str, ui_client: ModelBusClient) -> None:  # type: ignore[no-untyped-def]
    key = add_record(ui_client, f"delete-me-{uuid.uuid4().hex[:6]}")
    path = ui_client.config.model_path(f"{key}.safetensors")
    ready(page, f"{ui_api}/ui/models/{key}")
    page.check("#delete-form input[name=delete_files]")
    page.click("#delete-form button[type=submit]")
    dialog = page.locator("#delete-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("files")
    page.click("#confirm-delete")
    page.wait_for_url(re.compile(r"/ui\?deleted="))
    expect(page.locator(".notice")).to_have_text(f"Deleted model {key}.")
    expect(page.locator(f'#models-table tr[data-key="{key}"]')).to_have_count(0)
    assert not path.exists()
    with pytest.raises(Exception, match="unknown model"):
        ui_client.get_model(key)


def test_a_new_worker_and_a_live_load_appear_without_a_reload(
        new_page, ui_api: str, ui_bus: Bus, ui_client: ModelBusClient) -> None:  # type: ignore[no-untyped-def]
    config = ui_client.config
    key = f"ui-load-{uuid.uuid4().hex[:8]}"
    path = config.models_path / f"{key}.safetensors"
    loadable.write_lora(path, seed=3)
    ui_client.add_model(key, {"name": "loadable lora", "model_type": "lora", "model_format": "lycoris",
                              "base_model": "sd-1", "path": path.name, "hash": key})
    workers = new_page()
    ready(workers, f"{ui_api}/ui/workers")
    expect(workers.locator("#live")).to_have_attribute("data-state", "live")
    name = f"gpu-ui-{uuid.uuid4().hex[:6]}"
    proc = start_gpu_worker(ui_bus.env, name, ui_bus.logs / f"{name}.log")
    try:
        card = workers.locator(f'.worker[data-worker="{name}"]')
        expect(card).to_be_visible(timeout=120_000)  # torch's import on a loaded machine
        expect(card.locator(".meta")).to_contain_text("cpu")
        model = new_page()
        ready(model, f"{ui_api}/ui/models/{key}")
        model.click("#load")
        expect(model.locator("#load-result")).to_contain_text(f"loaded on {name}", timeout=120_000)
        expect(model.locator("#holders")).to_contain_text(name)
        feed = workers.locator("#feed")
        expect(feed.locator('li[data-type="model_load_completed"]')).to_contain_text(key)
        expect(card.locator(f'.held li[data-model="{key}"]')).to_be_visible()
        expect(card.locator("progress").first).to_be_visible()  # the RAM bar against its limit
        shoot(workers, "workers")
        model.click("#unload")
        expect(model.locator("#load-result")).to_contain_text("unloaded")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_errors_are_shown_where_they_happened(page, ui_api: str, ui_bus: Bus) -> None:  # type: ignore[no-untyped-def]
    outside = "/etc/hostname"  # not inside an import root: the API refuses to read it
    ready(page, f"{ui_api}/ui/install")
    page.fill("#source", outside)
    page.click("#install-submit")
    error = page.locator("#install-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("import root")
    expect(page.locator("#source")).to_have_value(outside)  # nothing typed is lost
    expect(page.locator("#install-jobs .job")).to_have_count(0)
    # a job that fails on the worker shows the CLI's one line on its card
    page.fill("#source", ui_bus.files.url_for("nowhere/gone.safetensors"))
    page.click("#install-submit")
    card = page.locator("#install-jobs .job")
    expect(card.locator(".job-error")).to_contain_text(re.compile(r"install of .*gone\.safetensors error: .*404"))
    # a bad query in the address: the table says why, in place of the rows
    ready(page, f"{ui_api}/ui?offset=abc")
    expect(page.locator("#content .error")).to_contain_text("invalid offset")


def test_jobs_page_lists_installs_pauses_resumes_and_cancels(page, ui_api: str, ui_bus: Bus, ui_client: ModelBusClient) -> None:  # type: ignore[no-untyped-def]
    from tests.servers.file_server import Fault
    name = f"files/slow-{uuid.uuid4().hex[:6]}.safetensors"
    ui_bus.files.add_file(name, b"\x00" * (2 << 20))
    ui_bus.files.set_fault(name, Fault(stall_after=64 << 10, stall_seconds=60, times=None))
    job = ui_client.install(ui_bus.files.url_for(name))
    ready(page, f"{ui_api}/ui/jobs")
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    expect(row).to_be_visible()
    row.locator('button[data-action="pause"]').click()
    expect(row).to_have_attribute("data-state", "paused", timeout=60_000)
    wait_until(lambda: ui_client.job(job["id"])["state"] == "paused", 60, "the job to be paused")
    row.locator('button[data-action="resume"]').click()
    expect(row).not_to_have_attribute("data-state", "paused", timeout=60_000)
    cancel = row.locator('button[data-action="cancel"]')
    expect(cancel).to_be_visible()
    shoot(page, "jobs")
    cancel.click()
    expect(page.locator(f'tr[data-job="{job["id"]}"]')).to_have_attribute("data-state", "cancelled")
    wait_until(lambda: ui_client.job(job["id"])["state"] == "cancelled", 60, "the job to be cancelled")

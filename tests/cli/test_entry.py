"""The console script builds only the command it is given: every command's help and run still work
through it, an unknown command says so, and importing the CLI imports no torch, diffusers,
transformers or FastAPI (nor structlog, which comes with the first log line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelbus.services.cli.app import COMMANDS, GROUPS, named_command

CLI = [sys.executable, "-m", "modelbus.services.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_the_named_command_is_the_first_word_after_the_global_flag() -> None:
    assert named_command(["list", "--json"]) == "list"
    assert named_command(["--debug", "show", "k"]) == "show"
    assert named_command(["--help"]) is None and named_command([]) is None
    assert named_command(["--debug", "--help", "list"]) is None


def test_importing_the_cli_imports_nothing_heavy(modelbus_env: dict[str, str]) -> None:
    heavy = ("torch", "diffusers", "transformers", "fastapi", "structlog", "modelbus.services.cli.models")
    probe = f"import json, sys\nimport modelbus.services.cli\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("command", [*COMMANDS, *GROUPS])
def test_every_command_has_its_help_through_the_console_script(command: str, modelbus_env: dict[str, str]) -> None:
    done = _run(command, "--help")
    assert done.returncode == 0, done.stderr
    assert f"Usage: modelbus {command} " in done.stdout


def test_the_whole_help_lists_every_command(modelbus_env: dict[str, str]) -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for command in (*COMMANDS, *GROUPS):
        assert f" {command} " in done.stdout


def test_an_unknown_command_is_one_clear_error(modelbus_env: dict[str, str]) -> None:
    done = _run("lst")
    assert done.returncode == 2
    assert "No such command 'lst'" in done.stderr


def test_the_reading_commands_run_and_import_only_their_own(modelbus_env: dict[str, str], tmp_path: Path) -> None:
    models = Path(modelbus_env["MODELBUS_ROOT"]) / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "a.safetensors").write_bytes(b"x" * 10)
    from modelbus.services.client import ModelBusClient
    with ModelBusClient() as client:
        client.add_model("k0", {"name": "alpha", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                                "path": "loras/a.safetensors", "hash": "blake3:00"})
    listed = _run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == ["alpha"]
    assert "alpha" in _run("list").stdout
    assert json.loads(_run("show", "alpha", "--json").stdout)["key"] == "k0"
    assert json.loads(_run("jobs", "--json").stdout) == []
    assert json.loads(_run("workers", "--json").stdout) == []
    events = _run("events", "--count", "5", "--json")
    assert events.returncode == 0, events.stderr
    assert [json.loads(line)["type"] for line in events.stdout.splitlines()] == ["ModelAdded"]
    missing = _run("show", "nope")
    assert missing.returncode == 3 and missing.stderr.startswith("error:") and len(missing.stderr.splitlines()) == 1


def test_logging_set_up_later_applies_at_the_first_line_of_either_kind() -> None:
    probe = """
import logging, sys
from modelbus.events.logs import configure_logging, configure_logging_later, get_logger
configure_logging_later("json", "INFO")
log = get_logger("probe")
print("structlog" in sys.modules)
logging.getLogger("rq.worker").warning("stdlib first %s", "line")
log.info("then_structlog", token="s3cret")
log.debug("filtered_out")
configure_logging("json", "DEBUG")  # a logger already used follows a new set-up
log.debug("now_shown")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == ["False"]  # nothing logged yet: structlog not imported; logs never on stdout
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [("stdlib first line", "warning"),
                                                                   ("then_structlog", "info"),
                                                                   ("now_shown", "debug")]
    assert lines[0]["logger"] == "rq.worker" and lines[1]["token"] == "[redacted]"


#: what none of the reading commands may import, run through the console script: the model stack, the
#: API, the logging library (no log line is written), pydantic-settings (services.config reads the
#: environment itself), and what only installs and loads use
NOT_FOR_READING = ("torch", "diffusers", "transformers", "fastapi", "structlog", "pydantic_settings", "rq", "yaml",
                   "httpx", "PIL", "modelbus.services.install.service", "modelbus.services.download",
                   "modelbus.services.load", "modelbus.services.catalog", "modelbus.services.routing")
#: what a command line's process had imported when it ended, written by an exit hook to PROBE_OUT
AT_EXIT = ("import atexit, json, os, runpy, sys\n"
           "atexit.register(lambda: open(os.environ['PROBE_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
           "sys.argv = ['modelbus', *sys.argv[1:]]\nrunpy.run_module('modelbus.services.cli', run_name='__main__')")


@pytest.mark.parametrize("args", [("list",), ("list", "--json"), ("show", "alpha"), ("show", "alpha", "--json"),
                                  ("jobs",), ("workers",), ("events", "--count", "5"), ("events", "--json")])
def test_the_reading_commands_never_import_the_heavy_libraries(args: tuple[str, ...], modelbus_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    from modelbus.services.client import ModelBusClient
    with ModelBusClient() as client:
        client.add_model("k0", {"name": "alpha", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                                "path": "loras/a.safetensors", "hash": "blake3:00"})
    out = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", AT_EXIT, *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "COLUMNS": "200", "PROBE_OUT": str(out)})
    assert done.returncode == 0, done.stderr
    assert ("k0" if args[0] in ("list", "show", "events") else "") in done.stdout  # the command did its work
    modules = json.loads(out.read_text())
    assert "modelbus.services.records.models" in modules  # (the probe sees what the command imported)
    assert [m for m in modules if m.split(".")[0] in NOT_FOR_READING or m.startswith(NOT_FOR_READING)] == []
    if "--json" in args:  # JSON is printed without rich (its console is made when first used)
        assert [m for m in modules if m.split(".")[0] == "rich"] == []


def test_a_program_importing_the_cli_keeps_its_gc_as_it_was(modelbus_env: dict[str, str]) -> None:
    # the console script freezes what its imports made; a test or typer's runner importing it is not frozen
    probe = ("import gc, json\nbefore = gc.isenabled()\nimport modelbus.services.cli\n"
             "from modelbus.services.cli.startup import started_as_the_cli\n"
             "print(json.dumps([before, gc.isenabled(), gc.get_freeze_count(), started_as_the_cli()]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, 0, False]

"""CLI: ``python -m tests.servers file DIR [--port N]`` or ``python -m tests.servers hf owner/repo=DIR ...``.

Prints the server's URL on the first line of stdout, then serves until interrupted."""

from __future__ import annotations

import sys

from . import file_server, hf_server


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"file": file_server.main, "hf": hf_server.main}
    if not args or args[0] not in commands:
        sys.exit("usage: python -m tests.servers {file DIR | hf owner/repo=DIR ...} [--host H] [--port N]")
    commands[args[0]](args[1:])


if __name__ == "__main__":
    main()

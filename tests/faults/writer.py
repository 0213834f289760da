"""A writer process for the fault tests: adds models through the record service and prints ``ACK <key>``
once its add returned (acknowledged), or ``ERR <key> <error>`` when it raised.

    python -m tests.faults.writer REDIS_URL NAMESPACE ROOT PREFIX COUNT [PAUSE_S]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modelbus.events.logs import configure_logging
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceSQL


def config_for(key: str) -> dict[str, str]:
    return {"name": key, "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
            "path": f"sd-1/lora/{key}.safetensors"}


def main(argv: list[str]) -> int:
    url, namespace, root, prefix, count = argv[:5]
    pause = float(argv[5]) if len(argv) > 5 else 0.0
    configure_logging("json", "WARNING")  # logs go to stderr: stdout carries the acknowledgements
    config = AppConfig.load(root=Path(root), namespace=namespace, redis_url=url)
    store = RedisEventStore.from_config(config)  # MODELBUS_DURABILITY=replicated: each append WAITs
    service = ModelRecordServiceSQL.from_db_file(Path(root) / f"{prefix}.db", store, config=config)
    print("READY", flush=True)
    for n in range(int(count)):
        key = f"{prefix}-{n}"
        try:
            service.add_model(key, config_for(key))
        except Exception as exc:  # noqa: BLE001 reported, and the writer carries on: the test counts these
            print(f"ERR {key} {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        else:
            print(f"ACK {key}", flush=True)
        if pause:
            time.sleep(pause)
    service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

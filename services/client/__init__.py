"""The Python client: publish commands, read records and jobs, subscribe to events.

    from modelbus.services.client import ModelBusClient
    client = ModelBusClient()                    # configuration from MODELBUS_* / modelbus.yaml
    job = client.install("/path/to/model.safetensors")
    client.wait(job)
    for delivered in client.subscribe(types=["model_load_completed"]):
        print(delivered.event.payload)
"""

from modelbus.services.client.aio import AsyncModelBusClient
from modelbus.services.client.core import ModelBusClient
from modelbus.services.client.errors import (
    ClientError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    UnavailableError,
    WaitTimeoutError,
)
from modelbus.services.client.subscription import Cursor, Delivered, Subscription

__all__ = [
    "AsyncModelBusClient", "ClientError", "Cursor", "Delivered", "InvalidRequestError", "JobFailedError",
    "ModelBusClient", "NotFoundError", "Subscription", "UnavailableError", "WaitTimeoutError",
]

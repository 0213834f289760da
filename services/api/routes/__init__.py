"""The API's routers: models (records, installs, loads, workers), events (SSE), health and metrics."""

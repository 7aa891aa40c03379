"""The BentoML service of the marketplace pipeline (service.service:MarketplaceSearch).

`service.service` holds only the API class; `service.settings` (params), `service.bundle` (loading),
`service.engine` (inference and search, no HTTP), `service.responses` (response bodies),
`service.batching` (the micro-batcher), `service.multipart` (a BentoML work-around),
`service.request_validation` (the pure request checks), `service.schemas` and `service.ui` are its rooms.

Importing this package applies the project's process environment (telemetry off, hubs
offline) before `service.service` imports BentoML (see pipeline_steps/runtime_env.py).
"""

from pipeline_steps import runtime_env as _runtime_env

_runtime_env.apply()

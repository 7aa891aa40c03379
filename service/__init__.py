"""The BentoML service of the marketplace pipeline (service.service:MarketplaceSearch).

`service.request_validation` holds the pure request checks, `service.engine` the
in-process engine (bundle loading, inference, search) the service wraps.

Importing this package applies the project's process environment (telemetry off, hubs
offline) before `service.service` imports BentoML (see pipeline_steps/runtime_env.py).
"""

from pipeline_steps import runtime_env as _runtime_env

_runtime_env.apply()

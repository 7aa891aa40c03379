"""The BentoML service of the marketplace pipeline (service.service:MarketplaceSearch).

`service.request_validation` holds the pure request checks, `service.engine` the
in-process engine (bundle loading, inference, search) the service wraps.
"""

"""Serve the `pipeline` flow as a deployment, so it can be triggered from the Prefect UI.

Needs a running Prefect server (`make prefect-server`) and PREFECT_API_URL
pointing at it; runs in the foreground until interrupted, executing the runs
the UI asks for in this process.
"""

from __future__ import annotations

import argparse

from flows.pipeline import pipeline_flow

DEPLOYMENT_NAME = "marketplace-pipeline"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default=DEPLOYMENT_NAME)
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * *'")
    args = parser.parse_args(argv)
    pipeline_flow.serve(name=args.name, cron=args.cron, tags=["marketplace"])


if __name__ == "__main__":
    main()

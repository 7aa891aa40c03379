"""The registry-entry promotion lock: which failures of its compare-and-set mean "taken, retry".

The lock itself, against a real MLflow server on PostgreSQL with two concurrent registers, is
tests/test_team_servers.py::test_two_concurrent_registers_end_with_one_champion_the_better; it
caught the second case below (the holder released the entry while MLflow worded its refusal).
"""

from __future__ import annotations

import pytest
from mlflow.exceptions import RestException

from pipeline_steps.registry_lock import lock_is_taken


def _rest_error(code: str, message: str) -> RestException:
    """The exception MlflowClient raises for an error answer of the tracking server."""
    return RestException({"error_code": code, "message": message})


@pytest.mark.parametrize(
    ("error", "taken"),
    [
        (_rest_error("RESOURCE_ALREADY_EXISTS", "Registered Model (name=m.promotion-lock) already exists."), True),
        # the holder deleted its entry between the server's insert failing and its read-back
        (_rest_error("RESOURCE_DOES_NOT_EXIST", "Registered Model with name=m.promotion-lock not found"), True),
        (_rest_error("PERMISSION_DENIED", "User cannot create registered models"), False),
        (_rest_error("INVALID_PARAMETER_VALUE", "Invalid model name"), False),
    ],
)
def test_only_a_taken_lock_is_retried(error: RestException, taken: bool) -> None:
    assert lock_is_taken(error) is taken

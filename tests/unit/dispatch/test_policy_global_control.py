"""The workspace policy's `global_control` block: validated by the experiments module of rules,
stored under exactly the key rules reads (`policy->'global_control'`)."""

from __future__ import annotations

import pytest

from services.dispatch.policy import PolicyError, WorkspacePolicy, parse_policy
from services.rules.experiments import GlobalControl


def test_global_control_is_kept_and_normalized() -> None:
    policy = parse_policy({"global_control": {"percent": 5.0, "salt": " spring "}})

    assert policy.global_control == GlobalControl(percent=5.0, salt="spring")
    assert policy.to_dict()["global_control"] == {"percent": 5, "salt": "spring"}
    assert parse_policy(policy.to_dict()) == policy


def test_without_a_salt_only_the_percent_is_stored() -> None:
    policy = parse_policy({"global_control": {"percent": 2.5}})

    assert policy.to_dict()["global_control"] == {"percent": 2.5}


def test_a_policy_without_global_control_stores_no_such_key() -> None:
    """Policies applied before the block existed keep their stored form: re-applying is a no-op."""
    assert "global_control" not in parse_policy({}).to_dict()
    assert "global_control" not in parse_policy({"global_control": None}).to_dict()
    assert WorkspacePolicy().global_control is None


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ({"percent": 51}, "global_control.percent", "at most 50"),
        ({"percent": -1}, "global_control.percent", "between 0 and 100"),
        ({"percent": "5"}, "global_control.percent", "must be a number"),
        ({"percent": True}, "global_control.percent", "must be a number"),
        ({}, "global_control.percent", "is required"),
        ({"percent": 5, "salt": 7}, "global_control.salt", "must be a string"),
        ({"percent": 5, "seed": "x"}, "global_control.seed", "unknown field"),
        ([5], "global_control", "must be a mapping"),
    ],
)
def test_invalid_global_control_names_the_field(block: object, path: str, message: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_policy({"global_control": block})

    assert error.value.path == path
    assert message in error.value.message
    assert str(error.value).startswith(f"{path}: ")

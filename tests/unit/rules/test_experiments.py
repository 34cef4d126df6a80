"""Experiment blocks: parsing with field paths, deterministic assignment (proportions, what is
and is not stable), global control, variant overrides, and conversion attribution."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import yaml

from services.rules.domain import parse_campaign
from services.rules.experiments import (
    CONTROL,
    DEFAULT_VARIANT,
    GLOBAL_CONTROL,
    Assignment,
    Conversion,
    Experiment,
    ExperimentError,
    GlobalControl,
    Variant,
    assign,
    draw,
    in_global_control,
    parse_blocks,
    parse_conversion,
    parse_experiment,
    parse_global_control,
    pick_variant,
)

ISSUE_EXAMPLE = """
id: abandoned-cart
trigger: {event: add_to_cart}
delay: 1h
message:
  channel: email
  to: "{{ user.traits.email }}"
  subject: "You left something in your cart"
  body: "Cart {{ trigger.properties.cart_id }} is waiting."
experiment:
  control: 10                 # percent of entering users held out: nothing sent, still measured
  variants:
    - {name: wait-1h,  weight: 50, delay: 1h}
    - {name: wait-24h, weight: 50, delay: 24h, message: {subject: "Still thinking about it?"}}
conversion:
  event: purchase
  within: 3d                  # from the send (or, for control, from when it would have been sent)
  match: "conversion.properties.cart_id == trigger.properties.cart_id"   # optional
"""

USERS = [f"user-{n}" for n in range(100_000)]

# Upper 0.1% points of the chi-square distribution by degrees of freedom.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}


def campaign() -> dict[str, Any]:
    doc = yaml.safe_load(ISSUE_EXAMPLE)
    assert isinstance(doc, dict)
    return doc


def issue_experiment() -> Experiment:
    experiment = parse_blocks(campaign()).experiment
    assert experiment is not None
    return experiment


def groups(
    experiment: Experiment | None,
    campaign_id: str = "abandoned-cart",
    users: list[str] = USERS,
    **kw: Any,
) -> list[str]:
    return [assign("ws", campaign_id, user, experiment, **kw).group for user in users]


@functools.cache
def issue_groups() -> tuple[str, ...]:
    """The issue experiment's groups of USERS, computed once for the stability tests."""
    return tuple(groups(issue_experiment()))


def chi_square(observed: Counter[str], expected_shares: dict[str, float]) -> float:
    total = sum(observed.values())
    assert set(observed) <= set(expected_shares)
    return sum(
        (observed.get(name, 0) - total * share) ** 2 / (total * share)
        for name, share in expected_shares.items()
    )


# ------------------------------------------------------------------------------------ parsing


def test_the_issue_example_parses_into_frozen_dataclasses() -> None:
    blocks = parse_blocks(campaign())
    assert blocks.experiment == Experiment(
        control_percent=10.0,
        variants=(
            Variant("wait-1h", 50.0, timedelta(hours=1)),
            Variant("wait-24h", 50.0, timedelta(hours=24), {"subject": "Still thinking about it?"}),
        ),
    )
    assert blocks.conversion == Conversion(
        event="purchase",
        within=timedelta(days=3),
        match="conversion.properties.cart_id == trigger.properties.cart_id",
    )
    assert blocks.experiment.groups == ("control", "wait-1h", "wait-24h")
    assert blocks.experiment.shares() == {"control": 0.1, "wait-1h": 0.45, "wait-24h": 0.45}


def test_the_canonical_form_parses_back_to_the_same_blocks() -> None:
    blocks = parse_blocks(campaign())
    assert parse_blocks(blocks.to_dict()) == blocks
    assert blocks.to_dict()["experiment"]["control"] == 10  # 10.0 and 10 are written alike


def test_a_campaign_without_the_blocks_has_neither() -> None:
    doc = campaign()
    del doc["experiment"], doc["conversion"]
    blocks = parse_blocks(doc)
    assert blocks.experiment is None
    assert blocks.conversion is None
    assert blocks.to_dict() == {}


def test_without_variants_an_experiment_is_a_hold_out_test_of_the_campaign_as_written() -> None:
    experiment = parse_experiment({"control": 20})
    assert experiment.variants == (Variant(DEFAULT_VARIANT),)
    assert experiment.groups == (CONTROL, DEFAULT_VARIANT)


def test_variants_without_weights_split_equally() -> None:
    experiment = parse_experiment({"variants": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    assert experiment.shares() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert experiment.groups == ("a", "b", "c")


WEIGHT_1 = "experiment.variants[1].weight"


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ("[]", "experiment", "must be a mapping"),
        ("{control: 10, holdout: 5}", "experiment.holdout", "unknown field"),
        ("{control: '10'}", "experiment.control", "must be a number"),
        ("{control: true}", "experiment.control", "must be a number"),
        ("{control: -1}", "experiment.control", "between 0 and 100"),
        ("{control: 100}", "experiment.control", "must be below 100"),
        ("{control: .nan}", "experiment.control", "finite"),
        ("{control: 0, variants: [{name: a}]}", "experiment", "at least two variants"),
        ("{}", "experiment", "at least two variants"),
        ("{control: 10, variants: []}", "experiment.variants", "must not be empty"),
        ("{control: 10, variants: {name: a}}", "experiment.variants", "must be a list"),
        ("{variants: [{name: a, weight: 1}, 7]}", "experiment.variants[1]", "must be a mapping"),
        ("{variants: [{name: a}, {weight: 5}]}", "experiment.variants[0].weight", "every variant"),
        ("{variants: [{name: a, weight: 1}, {weight: 5}]}", "experiment.variants[1].name", "req"),
        ("{variants: [{name: a, weight: 1}, {name: b, weight: 0}]}", WEIGHT_1, "greater than 0"),
        ("{variants: [{name: a, weight: 1}, {name: b, weight: -3}]}", WEIGHT_1, "greater than 0"),
        ("{variants: [{name: a, weight: 1}, {name: b, weight: x}]}", WEIGHT_1, "must be a number"),
        ("{variants: [{name: a}, {name: A}]}", "experiment.variants[1].name", "must match"),
        ("{variants: [{name: a}, {name: a}]}", "experiment.variants[1].name", "used twice"),
        ("{variants: [{name: a}, {name: control}]}", "experiment.variants[1].name", "reserved"),
        ("{variants: [{name: a}, {name: b, delay: 1y}]}", "experiment.variants[1].delay", "dur"),
        ("{variants: [{name: a}, {name: b, color: red}]}", "experiment.variants[1].color", "unk"),
        (
            "{variants: [{name: a}, {name: b, message: {channel: sms}}]}",
            "experiment.variants[1].message.channel",
            "cannot change the channel",
        ),
        (
            "{variants: [{name: a}, {name: b, message: {subjekt: x}}]}",
            "experiment.variants[1].message.subjekt",
            "unknown field",
        ),
        (
            "{variants: [{name: a}, {name: b, message: {subject: 3}}]}",
            "experiment.variants[1].message.subject",
            "must be a string",
        ),
        (
            "{variants: [{name: a}, {name: b, message: {}}]}",
            "experiment.variants[1].message",
            "at least one field",
        ),
        ("{control: 5, salt: 7}", "experiment.salt", "must be a string"),
    ],
)
def test_invalid_experiments_name_the_field(block: str, path: str, message: str) -> None:
    with pytest.raises(ExperimentError) as caught:
        parse_experiment(yaml.safe_load(block))
    assert caught.value.path == path
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ("{within: 3d}", "conversion.event", "is required"),
        ("{event: 'no/slash', within: 3d}", "conversion.event", "not a valid event name"),
        ("{event: purchase}", "conversion.within", "is required"),
        ("{event: purchase, within: 0s}", "conversion.within", "longer than 0s"),
        ("{event: purchase, within: 91d}", "conversion.within", "at most 90d"),
        ("{event: purchase, within: 3 days}", "conversion.within", "duration"),
        ("{event: purchase, within: 3d, match: 42}", "conversion.match", "must be a string"),
        ("{event: purchase, within: 3d, where: x}", "conversion.where", "unknown field"),
    ],
)
def test_invalid_conversions_name_the_field(block: str, path: str, message: str) -> None:
    with pytest.raises(ExperimentError) as caught:
        parse_conversion(yaml.safe_load(block))
    assert caught.value.path == path
    assert message in caught.value.message


def test_global_control_is_validated_like_the_rest() -> None:
    assert parse_global_control({"percent": 5}) == GlobalControl(5.0)
    with pytest.raises(ExperimentError) as caught:
        parse_global_control({"percent": 60})
    assert caught.value.path == "global_control.percent"
    with pytest.raises(ExperimentError) as caught:
        parse_global_control({"salt": "x"})
    assert caught.value.path == "global_control.percent"


# ------------------------------------------------------------------------------------ assignment


def test_draws_are_uniform_numbers_in_the_unit_interval_and_escape_their_parts() -> None:
    values = [draw("x", str(n)) for n in range(10_000)]
    assert all(0.0 <= value < 1.0 for value in values)
    assert draw("a|b", "c") != draw("a", "b|c")
    assert sum(values) / len(values) == pytest.approx(0.5, abs=0.01)


def test_assignment_is_deterministic() -> None:
    experiment = issue_experiment()
    first = [assign("ws", "abandoned-cart", user, experiment) for user in USERS[:1000]]
    copy = issue_experiment()
    again = [assign("ws", "abandoned-cart", user, copy) for user in USERS[:1000]]
    assert first == again


def test_the_hash_scheme_is_pinned() -> None:
    """Changing the scheme would silently reshuffle every running experiment."""
    digest = hashlib.sha256(b"nudge.experiment.v1|split|ws|abandoned-cart|user-0|").digest()
    expected = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    assignment = assign("ws", "abandoned-cart", "user-0", issue_experiment())
    assert assignment.bucket == expected == 0.5784076838939777
    assert list(issue_groups()[:6]) == [
        "wait-24h",
        "wait-1h",
        "wait-1h",
        "wait-24h",
        "wait-1h",
        "wait-1h",
    ]


def test_proportions_match_the_weights_over_100k_users() -> None:
    observed = Counter(issue_groups())
    statistic = chi_square(observed, {"control": 0.10, "wait-1h": 0.45, "wait-24h": 0.45})
    assert statistic < CHI2_CRITICAL_0_001[2], (observed, statistic)


def test_unequal_weights_are_honoured_over_100k_users() -> None:
    experiment = parse_experiment(
        {
            "control": 5,
            "variants": [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 3},
                {"name": "c", "weight": 6},
            ],
        }
    )
    observed = Counter(groups(experiment))
    statistic = chi_square(observed, experiment.shares())
    assert statistic < CHI2_CRITICAL_0_001[3], (observed, statistic)


def test_campaigns_are_assigned_independently() -> None:
    experiment = issue_experiment()
    first = groups(experiment, "campaign-a")
    second = groups(experiment, "campaign-b")
    both_control = sum(1 for a, b in zip(first, second, strict=True) if a == b == CONTROL)
    # Independent: about 10% of 10% are in control of both, not the same 10%.
    assert both_control == pytest.approx(0.01 * len(USERS), rel=0.15)


def test_a_new_version_keeps_every_assignment() -> None:
    """The version is no input: editing messages, delays or the goal moves nobody."""
    edited = Experiment(
        control_percent=10,
        variants=(
            Variant("wait-1h", 50, timedelta(hours=2), {"body": "new text"}),
            Variant("wait-24h", 50, timedelta(hours=30)),
        ),
    )
    assert groups(edited) == list(issue_groups())


def test_raising_control_only_moves_users_from_variants_into_control() -> None:
    before = issue_groups()
    after = groups(parse_experiment({**campaign()["experiment"], "control": 20}))
    moved = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    assert set(moved) == {("wait-1h", CONTROL), ("wait-24h", CONTROL)}
    # About (20 - 10)% of everyone moved, and no user changed variant.
    assert sum(moved.values()) == pytest.approx(0.10 * len(USERS), rel=0.05)


def test_changing_weights_moves_only_users_between_the_old_and_new_boundary() -> None:
    def experiment(a: float, b: float) -> Experiment:
        return Experiment(0, (Variant("a", a), Variant("b", b)))

    before = groups(experiment(50, 50))
    after = groups(experiment(40, 60))
    moved = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    assert set(moved) == {("a", "b")}
    assert sum(moved.values()) == pytest.approx(0.10 * len(USERS), rel=0.05)


def test_changing_another_variants_weight_can_move_users_of_this_one() -> None:
    """Not stable, by design of cumulative slices: documented in the module."""
    before = groups(Experiment(0, (Variant("a", 1), Variant("b", 1), Variant("c", 1))))
    after = groups(Experiment(0, (Variant("a", 1), Variant("b", 1), Variant("c", 2))))
    left_a = sum(1 for b, a in zip(before, after, strict=True) if b == "a" and a != "a")
    # a's slice shrinks from [0, 1/3) to [0, 1/4): 1/12 of everyone leaves a.
    assert left_a == pytest.approx(len(USERS) / 12, rel=0.05)


def test_renaming_a_variant_keeps_its_users_and_reordering_moves_them() -> None:
    base = groups(Experiment(0, (Variant("a", 1), Variant("b", 1))))
    renamed = groups(Experiment(0, (Variant("a", 1), Variant("z", 1))))
    assert [("z" if g == "b" else g) for g in base] == renamed
    reordered = groups(Experiment(0, (Variant("b", 1), Variant("a", 1))))
    assert sum(1 for x, y in zip(base, reordered, strict=True) if x != y) > 0.9 * len(USERS)


def test_a_reset_draws_everyone_afresh() -> None:
    before = list(issue_groups())
    reset = parse_experiment({**campaign()["experiment"], "salt": "2025-06-reset"})
    after = groups(reset)
    changed = sum(1 for b, a in zip(before, after, strict=True) if b != a)
    # Independent draws: P(change) = 1 - sum(share^2) = 1 - (0.01 + 0.2025 + 0.2025) = 0.585.
    assert changed == pytest.approx(0.585 * len(USERS), rel=0.03)
    # `reset_salt` overrides the experiment's salt and gives the same result.
    assert groups(issue_experiment(), reset_salt="2025-06-reset") == after
    assert groups(reset, reset_salt="") == before


def test_global_control_excludes_the_same_users_from_every_campaign() -> None:
    control = GlobalControl(5)
    users = USERS[:40_000]
    experiment = issue_experiment()
    held = [
        {
            user
            for user, group in zip(
                users, groups(experiment, campaign_id, users, global_control=control), strict=True
            )
            if group == GLOBAL_CONTROL
        }
        for campaign_id in ("abandoned-cart", "win-back", "onboarding")
    ]
    assert held[0] == held[1] == held[2]
    assert len(held[0]) == pytest.approx(0.05 * len(users), rel=0.07)
    assert held[0] == {u for u in users if in_global_control("ws", u, control)}
    # Campaigns without an experiment hold them out too; everyone else gets the campaign.
    plain = groups(None, "order-shipped", users, global_control=control)
    assert {u for u, g in zip(users, plain, strict=True) if g == GLOBAL_CONTROL} == held[0]
    assert set(plain) == {GLOBAL_CONTROL, DEFAULT_VARIANT}


def test_global_control_is_independent_of_each_campaigns_control() -> None:
    observed = Counter(groups(issue_experiment(), global_control=GlobalControl(5)))
    shares = {GLOBAL_CONTROL: 0.05, CONTROL: 0.95 * 0.10, "wait-1h": 0.95 * 0.45}
    shares["wait-24h"] = shares["wait-1h"]
    assert chi_square(observed, shares) < CHI2_CRITICAL_0_001[3], observed


def test_global_control_depends_on_workspace_and_salt_only() -> None:
    control = GlobalControl(10)
    here = {u for u in USERS[:20_000] if in_global_control("ws", u, control)}
    elsewhere = {u for u in USERS[:20_000] if in_global_control("other", u, control)}
    resalted = {u for u in USERS[:20_000] if in_global_control("ws", u, GlobalControl(10, "x"))}
    assert here != elsewhere
    assert here != resalted
    assert not in_global_control("ws", "anyone", None)
    assert not in_global_control("ws", "anyone", GlobalControl(0))


def test_assignments_explain_themselves() -> None:
    experiment = issue_experiment()
    found: dict[str, Assignment] = {}
    for user in USERS[:200]:
        assignment = assign("ws", "abandoned-cart", user, experiment)
        found.setdefault(assignment.group, assignment)
    assert found[CONTROL].held_out
    assert found[CONTROL].bucket < 0.10
    assert found[CONTROL].reason.startswith("control: draw 0.")
    assert found[CONTROL].reason.endswith("< 10%")
    assert not found["wait-1h"].held_out
    assert found["wait-1h"].bucket < 0.5
    assert found["wait-24h"].bucket >= 0.5
    assert found["wait-24h"].reason.startswith("variant wait-24h: split draw")


def test_pick_variant_covers_the_whole_interval() -> None:
    variants = (Variant("a", 1), Variant("b", 2))
    assert pick_variant(variants, 0.0).name == "a"
    assert pick_variant(variants, 1 / 3 - 1e-12).name == "a"
    assert pick_variant(variants, 1 / 3).name == "b"
    assert pick_variant(variants, 0.9999999999999999).name == "b"
    with pytest.raises(ValueError, match="no variants"):
        pick_variant((), 0.5)


def test_the_analysis_horizon_is_the_longest_delay_plus_the_window() -> None:
    doc = campaign()
    assert parse_campaign(doc).analysis_horizon() == timedelta(hours=24, days=3)
    plain = {k: v for k, v in doc.items() if k != "experiment"}
    assert parse_campaign(plain).analysis_horizon() == timedelta(hours=1, days=3)
    without_goal = {k: v for k, v in doc.items() if k != "conversion"}
    assert parse_campaign(without_goal).analysis_horizon() is None

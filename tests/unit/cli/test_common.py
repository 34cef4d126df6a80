"""Pure helpers of the `nudge` command: env file, settings lookup, parsing, tables."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nudge.cli.common import (
    EXIT_USAGE,
    CliError,
    cli_env,
    format_env_file,
    format_table,
    parse_duration,
    parse_env_file,
    parse_json_object,
    parse_scopes,
    parse_time,
    read_env_file,
    require,
    service_address,
    state_dir,
    write_private_file,
)

# -- env file -------------------------------------------------------------------------------


def test_env_file_round_trips_awkward_values() -> None:
    values = {
        "DATABASE_URL": "postgresql://postgres@/nudge?host=/tmp/a b/pg&port=5432",
        "QUOTE": 'it\'s "quoted" $HOME `cmd`',
        "EMPTY": "",
    }
    text = format_env_file(values, header="written by a test\nsecond line")
    assert text.startswith("# written by a test\n# second line\n")
    assert parse_env_file(text) == values


def test_env_file_parsing_skips_comments_blanks_and_junk() -> None:
    text = """
# a comment
export A=1
B='two words'   # trailing comment
not an assignment
export
C="x=y"
1BAD=no
D='unbalanced
"""
    assert parse_env_file(text) == {"A": "1", "B": "two words", "C": "x=y"}


def test_env_file_is_valid_shell(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "env"
    path.write_text(format_env_file({"X": "a'b c", "Y": "$(echo nope)"}))
    result = subprocess.run(
        ["sh", "-c", f'. "{path}" && printf "%s|%s" "$X" "$Y"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == "a'b c|$(echo nope)"


def test_format_env_file_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="not a variable name"):
        format_env_file({"A-B": "x"})


def test_read_env_file_missing_is_empty(tmp_path: Path) -> None:
    assert read_env_file(tmp_path / "nope") == {}


def test_write_private_file_is_owner_only_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret"
    write_private_file(path, "one\n")
    write_private_file(path, "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]


# -- settings lookup ------------------------------------------------------------------------


def test_state_dir_default_and_override() -> None:
    assert state_dir({}) == Path(".nudge")
    assert state_dir({"NUDGE_STATE_DIR": "/x/y"}) == Path("/x/y")


def test_cli_env_prefers_environment_over_env_file(tmp_path: Path) -> None:
    (tmp_path / "env").write_text(
        format_env_file({"NUDGE_API_KEY": "from-file", "NUDGE_INGEST_ADDR": "127.0.0.1:1"})
    )
    environ = {
        "NUDGE_STATE_DIR": str(tmp_path),
        "NUDGE_INGEST_ADDR": "127.0.0.1:2",
        "NUDGE_RULES_ADDR": "",  # empty counts as unset
    }
    env = cli_env(environ)
    assert env["NUDGE_API_KEY"] == "from-file"
    assert env["NUDGE_INGEST_ADDR"] == "127.0.0.1:2"
    assert "NUDGE_RULES_ADDR" not in env


def test_cli_env_reads_dot_nudge_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".nudge").mkdir()
    (tmp_path / ".nudge" / "env").write_text("export DATABASE_URL=postgresql://x/y\n")
    monkeypatch.chdir(tmp_path)
    assert cli_env({})["DATABASE_URL"] == "postgresql://x/y"


def test_require_names_the_variable() -> None:
    assert require({"A": "1"}, "A") == "1"
    with pytest.raises(CliError, match="DATABASE_URL is not set") as info:
        require({}, "DATABASE_URL")
    assert info.value.code == EXIT_USAGE


def test_service_address_defaults_env_and_override() -> None:
    assert service_address({}, "ingest") == "127.0.0.1:50051"
    assert service_address({}, "dispatch") == "127.0.0.1:50054"
    assert service_address({"NUDGE_RULES_ADDR": ":6000"}, "rules") == "127.0.0.1:6000"
    env = {"NUDGE_RULES_ADDR": ":6000"}
    assert service_address(env, "rules", "example.com:7000") == "example.com:7000"
    with pytest.raises(CliError, match="NUDGE_SCHEDULER_ADDR"):
        service_address({"NUDGE_SCHEDULER_ADDR": "nope"}, "scheduler")


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("14d", timedelta(days=14)),
        ("2w", timedelta(weeks=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1.5h", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1d 2h", timedelta(hours=26)),
        (" 10m ", timedelta(minutes=10)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "h", "-5m", "5 minutes", "1h30", "m5", "1y", "1.h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_rejects_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_duration("0s")


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-02",
        " 2026-03-02 ",
        "2026-03-02T00:00:00",
        "2026-03-02T00:00:00Z",
        "2026-03-02T01:00:00+01:00",
    ],
)
def test_parse_time_is_utc(text: str) -> None:
    moment = parse_time(text, "--from")
    assert moment == datetime(2026, 3, 2, tzinfo=UTC)
    assert moment.tzinfo is UTC


@pytest.mark.parametrize("text", ["", "March 2nd", "2026-13-01", "2026-03-02T25:00"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(CliError, match=r"^--to: must be a date") as error:
        parse_time(text, "--to")
    assert error.value.code == EXIT_USAGE


def test_parse_json_object() -> None:
    assert parse_json_object('{"a": [1, 2.5, null]}', "--props") == {"a": [1, 2.5, None]}
    with pytest.raises(CliError, match=r"^--props: invalid JSON: ") as info:
        parse_json_object("{bad", "--props")
    assert info.value.code == EXIT_USAGE
    with pytest.raises(CliError, match="--traits: must be a JSON object, got list"):
        parse_json_object("[1]", "--traits")


def test_parse_scopes() -> None:
    assert parse_scopes("track, admin") == frozenset({"track", "admin"})
    assert parse_scopes("track") == frozenset({"track"})
    with pytest.raises(CliError, match="unknown scope"):
        parse_scopes("track,root")
    with pytest.raises(CliError, match="at least one"):
        parse_scopes(" , ")


def test_format_table_aligns_columns() -> None:
    table = format_table(["id", "state"], [["a-long-id", "sent"], ["b", ""]])
    assert table.splitlines() == ["id         state", "a-long-id  sent", "b"]


def test_cli_env_defaults_to_os_environ() -> None:
    env = cli_env()
    assert env.get("PATH") == os.environ.get("PATH")

"""Conversions between protobuf well-known types and plain Python data."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.struct_pb2 import ListValue, Struct
from google.protobuf.timestamp_pb2 import Timestamp


def _plain(value: Any) -> Any:
    if isinstance(value, Struct):
        return struct_to_dict(value)
    if isinstance(value, ListValue):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        # JSON has one number type; integral numbers come back as int so that CEL and
        # templates see 3, not 3.0.
        return int(value)
    return value


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A Struct as a plain dict (integral numbers as int)."""
    return {key: _plain(value) for key, value in struct.items()}


def dict_to_struct(data: Mapping[str, Any]) -> Struct:
    """A plain JSON-like dict as a Struct (datetimes become ISO strings)."""
    struct = Struct()
    struct.update(_jsonable(data))
    return struct


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def timestamp_or_none(ts: Timestamp, present: bool) -> datetime | None:
    """A Timestamp field as an aware datetime, or None when the field is unset."""
    if not present:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def to_timestamp(value: datetime) -> Timestamp:
    """An aware datetime as a Timestamp."""
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts

"""Open and click tracking for campaign email: signed tokens, link rewriting, safe redirects.

Pure: standard library only, no I/O.

A token names one send and what it tracks: the open pixel, or the link at position `index` of
that send's HTML. It is `base64url(version | kind | index | send_id | mac)` with the send id's
16 UUID bytes, a 2-byte index and a 16-byte HMAC-SHA256 over everything before it (48
characters): unguessable without the secret, and tamper-evident (`verify_token` compares MACs
in constant time). Tokens do not expire, like unsubscribe links: an old mail still redirects.

No open redirect. A click token carries only an index; the URL is looked up in the links
`rewrite_links` returned for that send (the caller persists them with the send), so the
redirect endpoint can only ever send a browser to a link that was in the message, and only to
an http(s) one: `resolve_click` re-checks the scheme of what it returns. Links with other
schemes (`mailto:`, `tel:`, `javascript:`, `data:`), relative links, fragments (`#top`) and
anchors without `href` are left exactly as they were and are never recorded.

Rewriting uses `html.parser` and splices only the `<a ...>` start tags it changes into the
original text, so everything else (comments, conditional comments for Outlook, whitespace,
entity spelling) is byte-for-byte what the template rendered. Links inside comments (including
`<!--[if mso]>` blocks) are therefore not tracked. `data-nudge-track="off"` on an anchor opts
it out. The open pixel goes before the last `</body>` (or at the end without one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from html.parser import HTMLParser
from typing import Final
from urllib.parse import quote, urlsplit

MAX_LINKS: Final = 1000
MAX_TOKEN_CHARS: Final = 64
MIN_SECRET_BYTES: Final = 16
OPT_OUT_ATTRIBUTE: Final = "data-nudge-track"
TRACKED_SCHEMES: Final = frozenset({"http", "https"})
PIXEL_GIF: Final = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
"""A transparent 1x1 GIF (43 bytes), the body of the open pixel response."""

_VERSION: Final = 1
_MAC_BYTES: Final = 16
_TOKEN_BYTES: Final = 1 + 1 + 2 + 16 + _MAC_BYTES
# Characters browsers drop from anywhere in a URL before parsing it (WHATWG URL: tab and
# newlines); removed before the scheme is judged, so "java\nscript:" is not mistaken for http.
_DROPPED_BY_BROWSERS: Final = str.maketrans("", "", "\t\n\r")


class InvalidTrackingTokenError(ValueError):
    """The token is malformed, forged or tampered with, or names no link of the send."""


class TokenKind(Enum):
    """What a token tracks."""

    OPEN = b"o"
    CLICK = b"c"


@dataclass(frozen=True, slots=True)
class TrackingToken:
    """A verified token: the send, and for a click the link's position in its links."""

    kind: TokenKind
    send_id: str
    index: int


def derive_secret(material: str) -> bytes:
    """A tracking key derived from other secret material (the webhook secret), domain-separated
    from the unsubscribe key derived from the same material."""
    return hmac.new(material.encode("utf-8"), b"nudge tracking token v1", hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"tracking secret must be at least {MIN_SECRET_BYTES} bytes")


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:_MAC_BYTES]


def make_token(kind: TokenKind, send_id: str, index: int, secret: bytes) -> str:
    """The token for the open pixel (`index` 0) or the link at `index` of the send."""
    _check_secret(secret)
    if not 0 <= index <= 0xFFFF:
        raise ValueError("link index out of range")
    body = bytes([_VERSION]) + kind.value + index.to_bytes(2, "big") + uuid.UUID(send_id).bytes
    token = body + _mac(secret, body)
    return base64.urlsafe_b64encode(token).decode("ascii")


def verify_token(token: str, secret: bytes) -> TrackingToken:
    """What a token stands for; InvalidTrackingTokenError unless it is ours and intact."""
    _check_secret(secret)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise InvalidTrackingTokenError("malformed token")
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError) as error:
        raise InvalidTrackingTokenError("malformed token") from error
    if len(raw) != _TOKEN_BYTES:
        raise InvalidTrackingTokenError("malformed token")
    body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if not hmac.compare_digest(_mac(secret, body), mac):
        raise InvalidTrackingTokenError("bad signature")
    # Only now, with the MAC verified, is the content trusted.
    if body[0] != _VERSION:
        raise InvalidTrackingTokenError("unknown token version")
    try:
        kind = TokenKind(body[1:2])
    except ValueError:
        raise InvalidTrackingTokenError("unknown token kind") from None
    return TrackingToken(kind, str(uuid.UUID(bytes=body[4:20])), int.from_bytes(body[2:4], "big"))


def open_url(base_url: str, send_id: str, secret: bytes) -> str:
    """The open pixel's URL: `<base>/o/<token>`."""
    return f"{_base(base_url)}/o/{make_token(TokenKind.OPEN, send_id, 0, secret)}"


def click_url(base_url: str, send_id: str, index: int, secret: bytes) -> str:
    """The redirect URL of link `index`: `<base>/c/<token>`."""
    return f"{_base(base_url)}/c/{make_token(TokenKind.CLICK, send_id, index, secret)}"


def _base(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in TRACKED_SCHEMES or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"tracking base URL must be http(s)://host[/path], got {base_url!r}")
    return base_url.rstrip("/")


def trackable(href: str) -> str | None:
    """The URL a browser would follow for this `href` when it is absolute http(s); else None.

    Leading/trailing whitespace is stripped and tab/newlines dropped, as browsers do.
    """
    url = href.strip(" \t\n\r\f").translate(_DROPPED_BY_BROWSERS)
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 literal
        return None
    if parts.scheme.lower() not in TRACKED_SCHEMES or not parts.hostname:
        return None
    return url


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The HTML to send and the links to persist with the send (position = link index)."""

    html: str
    links: tuple[str, ...]


def rewrite_links(
    html_text: str,
    send_id: str,
    base_url: str,
    secret: bytes,
    *,
    untracked: Collection[str] = (),
) -> Rewritten:
    """Point every trackable `<a href>` at the click redirect and add the open pixel.

    Links to a URL in `untracked` (the message's unsubscribe link) are left as written.

    Returns the rewritten HTML and the original URLs in order; persist the URLs with the
    send, they are what `resolve_click` redirects to. Each occurrence of a URL is its own link
    (clicks are attributed to the position). Beyond `MAX_LINKS` links are left untracked.
    """
    base = _base(base_url)
    _check_secret(secret)
    uuid.UUID(send_id)  # fail early on a send id a token cannot carry
    finder = _AnchorFinder()
    finder.feed(html_text)
    finder.close()
    own_prefix = f"{base}/c/"
    links: list[str] = []
    edits: list[tuple[int, int, str]] = []
    for start, end, attrs, self_closing in finder.anchors:
        if len(links) >= MAX_LINKS:
            break
        href_at = next((i for i, (name, _) in enumerate(attrs) if name == "href"), None)
        if href_at is None or _opted_out(attrs):
            continue
        href = attrs[href_at][1]
        url = None if href is None else trackable(href)
        if url is None or url.startswith(own_prefix) or url in untracked:
            continue
        attrs[href_at] = ("href", click_url(base, send_id, len(links), secret))
        links.append(url)
        edits.append((start, end, _start_tag("a", attrs, self_closing)))
    pixel = f'<img src="{html.escape(open_url(base, send_id, secret))}" {_PIXEL_ATTRIBUTES}>'
    at = finder.body_end if finder.body_end is not None else len(html_text)
    edits.append((at, at, pixel))
    out: list[str] = []
    cursor = 0
    for start, end, replacement in sorted(edits, key=lambda edit: edit[0]):
        out.append(html_text[cursor:start])
        out.append(replacement)
        cursor = end
    out.append(html_text[cursor:])
    return Rewritten("".join(out), tuple(links))


_PIXEL_ATTRIBUTES: Final = (
    'width="1" height="1" alt="" border="0" '
    'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0"'
)


def _opted_out(attrs: list[tuple[str, str | None]]) -> bool:
    return any(
        name == OPT_OUT_ATTRIBUTE and (value or "").strip().lower() in ("off", "false", "no")
        for name, value in attrs
    )


def _start_tag(tag: str, attrs: list[tuple[str, str | None]], self_closing: bool) -> str:
    parts = [tag]
    for name, value in attrs:
        parts.append(name if value is None else f'{name}="{html.escape(value, quote=True)}"')
    return f"<{' '.join(parts)}{' /' if self_closing else ''}>"


class _AnchorFinder(HTMLParser):
    """Collects `<a>` start tags with their exact position in the source text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[int, int, list[tuple[str, str | None]], bool]] = []
        self.body_end: int | None = None
        self._line_starts = [0]
        self._text_length = 0

    def feed(self, data: str) -> None:
        # Absolute offsets from (line, column): HTMLParser counts lines by "\n" only.
        for index, char in enumerate(data, self._text_length):
            if char == "\n":
                self._line_starts.append(index + 1)
        self._text_length += len(data)
        super().feed(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs, self_closing=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs, self_closing=True)

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()

    def _offset(self) -> int:
        """The source offset of the tag being handled (HTMLParser reports its line/column)."""
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def _record(self, tag: str, attrs: list[tuple[str, str | None]], *, self_closing: bool) -> None:
        raw = self.get_starttag_text()
        if tag != "a" or raw is None:
            return
        start = self._offset()
        self.anchors.append((start, start + len(raw), list(attrs), self_closing))


def resolve_click(verified: TrackingToken, links: Sequence[str]) -> str:
    """The URL a click token redirects to, from the links stored for its send (ASCII, ready for
    a `Location` header).

    `verified` is what `verify_token` returned for the token (only it makes a TrackingToken
    from untrusted input, so the MAC is checked once); the caller loads `links` by its
    `send_id`. Raises InvalidTrackingTokenError for an open token, an index that is not one of
    the send's links, or a stored link that is not absolute http(s) (never redirected to).
    """
    if verified.kind is not TokenKind.CLICK:
        raise InvalidTrackingTokenError("not a click token")
    if verified.index >= len(links):
        raise InvalidTrackingTokenError("no such link in this message")
    url = trackable(links[verified.index])
    if url is None:
        raise InvalidTrackingTokenError("the stored link is not an http(s) URL")
    return _ascii(url)


def _ascii(url: str) -> str:
    """The URL safe for a `Location` header: spaces and non-ASCII percent-encoded as UTF-8
    (what browsers do with them anyway); everything else as written."""
    return "".join(
        quote(char, safe="") if char == " " or ord(char) > 0x7E else char for char in url
    )

"""Open and click tracking: tokens that cannot be forged or altered, link rewriting that
touches only trackable anchors, and redirects only to links that were in the message."""

from __future__ import annotations

import base64
import re
import uuid

import pytest

from services.dispatch.tracking import (
    MAX_LINKS,
    PIXEL_GIF,
    InvalidTrackingTokenError,
    TokenKind,
    TrackingToken,
    click_url,
    derive_secret,
    make_token,
    open_url,
    resolve_click,
    rewrite_links,
    trackable,
    verify_token,
)

SECRET = derive_secret("webhook secret material")
OTHER_SECRET = derive_secret("another workspace's material")
SEND_ID = "7d1f1b9e-3c1b-5b7e-9a55-6e75646765a1"
BASE = "https://t.nudge.test"
CLICK = re.compile(r"https://t\.nudge\.test/c/([A-Za-z0-9_-]+=*)")
OPEN = re.compile(r"https://t\.nudge\.test/o/([A-Za-z0-9_-]+=*)")


def click_tokens(html: str) -> list[str]:
    return CLICK.findall(html)


# ------------------------------------------------------------------------------------ tokens


def test_tokens_round_trip_and_carry_the_send_and_link() -> None:
    token = make_token(TokenKind.CLICK, SEND_ID, 7, SECRET)
    assert verify_token(token, SECRET) == TrackingToken(TokenKind.CLICK, SEND_ID, 7)
    opened = make_token(TokenKind.OPEN, SEND_ID, 0, SECRET)
    assert verify_token(opened, SECRET) == TrackingToken(TokenKind.OPEN, SEND_ID, 0)
    assert len(token) == 48
    assert re.fullmatch(r"[A-Za-z0-9_-]{48}", token)  # URL-safe as it is


def test_tokens_are_deterministic_per_send_link_and_secret() -> None:
    token = make_token(TokenKind.CLICK, SEND_ID, 1, SECRET)
    assert token == make_token(TokenKind.CLICK, SEND_ID, 1, SECRET)
    others = {
        make_token(TokenKind.CLICK, SEND_ID, 2, SECRET),
        make_token(TokenKind.OPEN, SEND_ID, 1, SECRET),
        make_token(TokenKind.CLICK, str(uuid.uuid4()), 1, SECRET),
        make_token(TokenKind.CLICK, SEND_ID, 1, OTHER_SECRET),
    }
    assert token not in others
    assert len(others) == 4


def test_every_single_bit_flip_is_rejected() -> None:
    token = make_token(TokenKind.CLICK, SEND_ID, 3, SECRET)
    raw = bytearray(base64.urlsafe_b64decode(token))
    for position in range(len(raw)):
        for bit in range(8):
            tampered = bytearray(raw)
            tampered[position] ^= 1 << bit
            with pytest.raises(InvalidTrackingTokenError):
                verify_token(base64.urlsafe_b64encode(bytes(tampered)).decode(), SECRET)


def test_a_changed_link_index_without_the_secret_is_rejected() -> None:
    raw = bytearray(base64.urlsafe_b64decode(make_token(TokenKind.CLICK, SEND_ID, 0, SECRET)))
    raw[3] = 1  # point the token at link 1, keeping the MAC of link 0
    with pytest.raises(InvalidTrackingTokenError, match="bad signature"):
        verify_token(base64.urlsafe_b64encode(bytes(raw)).decode(), SECRET)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not a token",
        "A" * 48,
        "A" * 65,
        "AWMAALCtZBHlhUCtq0sqEqzp0R2UUj9Z269buNDYghQudE0",  # one character short
        "é" * 48,
    ],
)
def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(InvalidTrackingTokenError):
        verify_token(token, SECRET)


def test_a_token_of_another_secret_is_rejected() -> None:
    token = make_token(TokenKind.CLICK, SEND_ID, 0, OTHER_SECRET)
    with pytest.raises(InvalidTrackingTokenError, match="bad signature"):
        verify_token(token, SECRET)


def test_secrets_send_ids_and_indexes_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        make_token(TokenKind.OPEN, SEND_ID, 0, b"short")
    with pytest.raises(ValueError, match="badly formed"):
        make_token(TokenKind.OPEN, "not-a-uuid", 0, SECRET)
    with pytest.raises(ValueError, match="out of range"):
        make_token(TokenKind.CLICK, SEND_ID, 70_000, SECRET)
    assert derive_secret("x") != derive_secret("y")
    assert len(derive_secret("x")) == 32


def test_urls_put_the_token_under_the_base() -> None:
    assert open_url(BASE + "/", SEND_ID, SECRET) == (
        f"{BASE}/o/{make_token(TokenKind.OPEN, SEND_ID, 0, SECRET)}"
    )
    assert click_url("https://mail.test/track", SEND_ID, 2, SECRET).startswith(
        "https://mail.test/track/c/"
    )
    for bad in ("ftp://t.test", "t.test", "https://t.test/?x=1", "https://t.test/#f", "https://"):
        with pytest.raises(ValueError, match="tracking base URL"):
            open_url(bad, SEND_ID, SECRET)


def test_the_pixel_is_a_transparent_1x1_gif() -> None:
    assert PIXEL_GIF[:10] == b"GIF89a\x01\x00\x01\x00"  # 1 x 1 pixels
    extension = PIXEL_GIF.index(b"\x21\xf9\x04")  # graphic control extension
    assert PIXEL_GIF[extension + 3] & 1  # transparency flag
    assert PIXEL_GIF.endswith(b";")
    assert len(PIXEL_GIF) == 43


# ------------------------------------------------------------------------------------ rewriting


def test_links_are_rewritten_and_recorded_in_order() -> None:
    html = (
        "<html><body>"
        '<a href="https://shop.test/cart">Cart</a> and '
        '<a class="btn" href="http://shop.test/p?id=7&amp;utm=x#reviews" target=_blank>P</a>'
        "</body></html>"
    )
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == ("https://shop.test/cart", "http://shop.test/p?id=7&utm=x#reviews")
    tokens = click_tokens(result.html)
    assert [verify_token(t, SECRET) for t in tokens] == [
        TrackingToken(TokenKind.CLICK, SEND_ID, 0),
        TrackingToken(TokenKind.CLICK, SEND_ID, 1),
    ]
    assert [resolve_click(verify_token(t, SECRET), result.links) for t in tokens] == list(
        result.links
    )
    # Other attributes survive (re-quoted), the text around is untouched.
    assert f'<a class="btn" href="{BASE}/c/{tokens[1]}" target="_blank">P</a>' in result.html
    assert result.html.startswith(f'<html><body><a href="{BASE}/c/{tokens[0]}">Cart</a> and ')


def test_query_strings_and_fragments_are_kept_exactly() -> None:
    href = "https://x.test/a/b?q=%C3%A9t%C3%A9&list=1&list=2&empty=#frag?not=query"
    result = rewrite_links(f'<a href="{href}">x</a>', SEND_ID, BASE, SECRET)
    assert result.links == (href,)
    assert resolve_click(verify_token(click_tokens(result.html)[0], SECRET), result.links) == href


@pytest.mark.parametrize(
    "href",
    [
        "javascript:alert(document.cookie)",
        "JaVaScRiPt:alert(1)",
        " javascript:alert(1)",
        "java\nscript:alert(1)",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "vbscript:msgbox(1)",
        "mailto:help@shop.test",
        "tel:+4930123456",
        "#top",
        "/relative/path",
        "//shop.test/protocol-relative",
        "page.html",
        "https://",
        "http:///no-host",
        "",
    ],
)
def test_anchors_that_are_not_absolute_http_links_are_left_untouched(href: str) -> None:
    html = f'<p><a href="{href}">link</a></p>'
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == ()
    assert result.html.startswith(html)  # only the pixel is added
    assert click_tokens(result.html) == []


def test_untouched_parts_are_byte_for_byte_the_same() -> None:
    html = (
        "<!DOCTYPE html>\n<HTML>\n<head><style>a { color: red }</style></head>\r\n"
        "<body>\n  <p>Caf&eacute; &amp; co &#169;</p>\n"
        '  <!-- <a href="https://in.comment.test">x</a> -->\n'
        '  <!--[if mso]><a href="https://outlook.test">o</a><![endif]-->\n'
        '  <script>var s = "<a href=\\"https://in.script.test\\">";</script>\n'
        "  <A HREF='https://shop.test/x'>X</A>\n"
        "  <a name=anchor>no href</a>\n"
        "</body>\n</HTML>\n"
    )
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == ("https://shop.test/x",)
    (token,) = click_tokens(result.html)
    (pixel_token,) = OPEN.findall(result.html)
    expected = html.replace(
        "<A HREF='https://shop.test/x'>", f'<a href="{BASE}/c/{token}">'
    ).replace(
        "</body>",
        f'<img src="{BASE}/o/{pixel_token}" width="1" height="1" alt="" border="0" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0"></body>',
    )
    assert result.html == expected
    assert verify_token(pixel_token, SECRET) == TrackingToken(TokenKind.OPEN, SEND_ID, 0)


def test_the_pixel_goes_at_the_end_without_a_body() -> None:
    result = rewrite_links("<p>Hi</p>", SEND_ID, BASE, SECRET)
    assert result.html.startswith("<p>Hi</p><img src=")
    assert result.html.endswith(">")
    assert len(OPEN.findall(result.html)) == 1


def test_entities_in_hrefs_are_decoded_for_storage_and_reescaped_in_html() -> None:
    html = '<a href="https://x.test/?a=1&amp;b=&quot;2&quot;">x</a>'
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == ('https://x.test/?a=1&b="2"',)


def test_each_occurrence_is_its_own_link_and_opt_outs_are_respected() -> None:
    html = (
        '<a href="https://x.test">1</a><a href="https://x.test">2</a>'
        '<a href="https://y.test" data-nudge-track="off">3</a>'
        '<a href="https://z.test" data-nudge-track="on">4</a>'
    )
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == ("https://x.test", "https://x.test", "https://z.test")
    assert '<a href="https://y.test" data-nudge-track="off">3</a>' in result.html


def test_rewriting_twice_does_not_wrap_tracked_links_again() -> None:
    once = rewrite_links('<a href="https://x.test">x</a>', SEND_ID, BASE, SECRET)
    twice = rewrite_links(once.html, SEND_ID, BASE, SECRET)
    assert twice.links == ()
    assert click_tokens(twice.html) == click_tokens(once.html)


def test_messy_html_is_handled() -> None:
    html = (
        "<table><tr><td><a href=https://unquoted.test/x?y=1>u</a>"
        '<a href="https://self.test"/>'
        '<a download href="https://ws.test/a b ">sp</a>'
        "<a href='https://ünïcode.test/päth'>ü</a>"
        '<a href="https://x.test" href="https://second.test">dup</a>'
        "<p>unclosed <b>tags"
    )
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert result.links == (
        "https://unquoted.test/x?y=1",
        "https://self.test",
        "https://ws.test/a b",
        "https://ünïcode.test/päth",
        "https://x.test",
    )
    tokens = click_tokens(result.html)
    assert f'<a href="{BASE}/c/{tokens[1]}" />' in result.html
    assert f'<a download href="{BASE}/c/{tokens[2]}">' in result.html
    assert 'href="https://second.test"' in result.html  # browsers follow the first href
    # Redirect targets are ASCII for the Location header.
    assert resolve_click(verify_token(tokens[2], SECRET), result.links) == "https://ws.test/a%20b"
    assert resolve_click(verify_token(tokens[3], SECRET), result.links) == (
        "https://%C3%BCn%C3%AFcode.test/p%C3%A4th"
    )


def test_links_beyond_the_limit_are_left_untracked() -> None:
    html = "".join(f'<a href="https://x.test/{n}">{n}</a>' for n in range(MAX_LINKS + 5))
    result = rewrite_links(html, SEND_ID, BASE, SECRET)
    assert len(result.links) == MAX_LINKS
    assert f'<a href="https://x.test/{MAX_LINKS}">' in result.html


def test_rewriting_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="badly formed"):
        rewrite_links("<a href='https://x.test'>x</a>", "42", BASE, SECRET)
    with pytest.raises(ValueError, match="tracking base URL"):
        rewrite_links("", SEND_ID, "javascript:alert(1)", SECRET)


# ------------------------------------------------------------------------------------ redirects


def test_only_links_of_the_message_are_followed() -> None:
    result = rewrite_links('<a href="https://shop.test">x</a>', SEND_ID, BASE, SECRET)
    valid = make_token(TokenKind.CLICK, SEND_ID, 0, SECRET)
    assert resolve_click(verify_token(valid, SECRET), result.links) == "https://shop.test"
    beyond = make_token(TokenKind.CLICK, SEND_ID, 1, SECRET)
    with pytest.raises(InvalidTrackingTokenError, match="no such link"):
        resolve_click(verify_token(beyond, SECRET), result.links)
    with pytest.raises(InvalidTrackingTokenError, match="no such link"):
        resolve_click(verify_token(valid, SECRET), [])


def test_an_open_token_is_not_a_click_token() -> None:
    opened = make_token(TokenKind.OPEN, SEND_ID, 0, SECRET)
    with pytest.raises(InvalidTrackingTokenError, match="not a click token"):
        resolve_click(verify_token(opened, SECRET), ["https://shop.test"])


@pytest.mark.parametrize(
    "stored",
    ["javascript:alert(1)", "data:text/html,<script>alert(1)</script>", "//evil.test", "/x"],
)
def test_a_stored_link_that_is_not_http_is_never_redirected_to(stored: str) -> None:
    """Defence in depth: even if such a link were stored, the resolver refuses it."""
    token = make_token(TokenKind.CLICK, SEND_ID, 0, SECRET)
    with pytest.raises(InvalidTrackingTokenError, match="not an http"):
        resolve_click(verify_token(token, SECRET), [stored])


def test_a_tampered_click_token_is_never_resolved() -> None:
    links = ["https://a.test", "https://b.test"]
    token = make_token(TokenKind.CLICK, SEND_ID, 0, SECRET)
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(InvalidTrackingTokenError):
        resolve_click(verify_token(forged, SECRET), links)


@pytest.mark.parametrize(
    ("href", "expected"),
    [
        ("https://x.test", "https://x.test"),
        ("  HTTPS://X.test/a\n", "HTTPS://X.test/a"),
        ("https://x.test/a\tb", "https://x.test/ab"),
        ("https://x.test/\x00", None),
        ("https://[::1", None),
        ("ftp://x.test", None),
    ],
)
def test_trackable_judges_urls_as_browsers_read_them(href: str, expected: str | None) -> None:
    assert trackable(href) == expected

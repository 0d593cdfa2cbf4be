"""Who may connect to which session: JWT checks (HS256, RS256, ES256, never `none`),
session ownership, session-id validation, takeover, the Bearer header, the
`/ws/agent` alias and `--allowed-origin`. Every refusal is a close code sent before
any frame, and a refused handshake leaves nothing in the store."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from trio_websocket import open_websocket_url

from conftest import CLIENT_WAIT_S, JWT_SECRET, ChatClient, open_chat, refusal, token_for
from fake_upstream import FakeUpstream, TextReply
from server import MAX_TOKEN_BYTES, ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------- helpers


@functools.cache
def _rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _ec_key(n: int = 0) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _claims(sub: str | None = "alice", ttl_s: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + ttl_s, **extra}
    if sub is not None:
        claims["sub"] = sub
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _crafted(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand, for tokens no well-behaved library will sign."""
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64url(signature)}"


def _hs256_with_key_text(key_text: str, claims: dict[str, Any]) -> str:
    """HS256 over `key_text` as the HMAC secret (PyJWT refuses a PEM as an HMAC key)."""
    header = {"alg": "HS256", "typ": "JWT"}
    unsigned = _crafted(header, claims).rsplit(".", 1)[0]
    signature = hmac.new(key_text.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{_b64url(signature)}"


def _url(server: ChatServer, path: str, token: str | None) -> str:
    query = f"?token={token}" if token is not None else ""
    return f"ws://127.0.0.1:{server.port}{path}{query}"


async def _refusal_code(
    server: ChatServer,
    session_id: str = "s1",
    *,
    token: str | None,
    headers: list[tuple[str, str]] | None = None,
) -> int | None:
    """Connect and read until the server closes; the close code. Fails if any frame
    (a `connected` above all) arrives before the close."""
    code, _ = await refusal(_url(server, f"/ws/chat/{session_id}", token), headers)
    return code


async def _assert_nothing_stored(
    server: ChatServer, session_id: str = "s1", *, token: str | None = None
) -> None:
    """The rightful user connects next: the session must be new to the store."""
    async with open_chat(server, session_id, "alice", token=token) as client:
        connected = client.connected  # type: ignore[attr-defined]
    assert connected["resumed"] is False
    assert connected["history_length"] == 0


# --------------------------------------------------------------------------- valid tokens


async def test_hs256_token_connects_as_its_sub(server: ChatServer) -> None:
    async with open_chat(server, "s-hs", token=token_for("alice")) as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_asymmetric_token_is_verified_with_the_public_key(
    start_server: StartServer, algorithm: str
) -> None:
    key: PrivateKey = _rsa_key() if algorithm == "RS256" else _ec_key()
    server = await start_server(jwt_public_key=_public_pem(key))
    token = jwt.encode(_claims("carol"), key, algorithm=algorithm)
    async with open_chat(server, "s-pk", token=token) as client:
        assert client.connected["user_id"] == "carol"  # type: ignore[attr-defined]


async def test_public_key_alone_is_enough_to_run(start_server: StartServer) -> None:
    server = await start_server(jwt_secret=None, jwt_public_key=_public_pem(_rsa_key()))
    token = jwt.encode(_claims("carol"), _rsa_key(), algorithm="RS256")
    async with open_chat(server, "s-pk-only", token=token) as client:
        assert client.connected["user_id"] == "carol"  # type: ignore[attr-defined]


async def test_bearer_header_token_connects_without_query_parameter(server: ChatServer) -> None:
    headers = [("Authorization", f"Bearer {token_for('alice')}")]
    url = _url(server, "/ws/chat/s-bearer", None)
    async with open_websocket_url(
        url, extra_headers=headers, connect_timeout=CLIENT_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
    ) as ws:
        with trio.fail_after(CLIENT_WAIT_S):
            connected = json.loads(await ws.get_message())
    assert connected["type"] == "connected" and connected["user_id"] == "alice"


async def test_bad_bearer_header_closes_4001_and_stores_nothing(server: ChatServer) -> None:
    headers = [("Authorization", "Bearer not-a-jwt")]
    assert await _refusal_code(server, token=None, headers=headers) == 4001
    await _assert_nothing_stored(server)


async def test_agent_alias_serves_the_same_sessions(server: ChatServer, fake: FakeUpstream) -> None:
    async with open_chat(server, "s-alias", prefix="agent") as client:
        assert client.connected["session_id"] == "s-alias"  # type: ignore[attr-defined]
        await client.send(type="message", content="via the alias")
        frames = await client.turn()
    assert frames[-2]["status"] == "completed"
    async with open_chat(server, "s-alias", prefix="chat") as client:
        assert client.connected["resumed"] is True  # type: ignore[attr-defined]
        assert client.connected["history_length"] == 2  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- refusals: 4001


def _other_secret_token() -> str:
    return jwt.encode(_claims(), "another-secret-that-is-long-enough-too", algorithm="HS256")


def _expired_token() -> str:
    return jwt.encode(_claims(ttl_s=-60), JWT_SECRET, algorithm="HS256")


def _missing_sub_token() -> str:
    return jwt.encode(_claims(sub=None), JWT_SECRET, algorithm="HS256")


def _empty_sub_token() -> str:
    return jwt.encode(_claims(sub=""), JWT_SECRET, algorithm="HS256")


def _alg_none_token(alg: str) -> Callable[[], str]:
    return lambda: _crafted({"alg": alg, "typ": "JWT"}, _claims())


def _tampered_payload_token() -> str:
    header, _, signature = token_for("alice").split(".")
    payload = _b64url(json.dumps(_claims("mallory")).encode())
    return f"{header}.{payload}.{signature}"


def _too_large_token() -> str:
    # Validly signed, only too big: between the token limit and the request-head limit.
    token = jwt.encode(_claims(padding="x" * MAX_TOKEN_BYTES), JWT_SECRET, algorithm="HS256")
    assert MAX_TOKEN_BYTES < len(token) < 2 * MAX_TOKEN_BYTES - 1024
    return token


REFUSED_TOKENS: dict[str, Callable[[], str | None]] = {
    "bad_signature": _other_secret_token,
    "tampered_payload": _tampered_payload_token,
    "expired": _expired_token,
    "alg_none": _alg_none_token("none"),
    "alg_None": _alg_none_token("None"),
    "alg_NONE": _alg_none_token("NONE"),
    "missing_sub": _missing_sub_token,
    "empty_sub": _empty_sub_token,
    "garbage": lambda: "garbage.not.ajwt",
    "garbage_no_dots": lambda: "definitely-not-a-token",
    "empty": lambda: "",
    "too_large": _too_large_token,
    "no_token_at_all": lambda: None,
}


@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
async def test_invalid_token_closes_4001_and_stores_nothing(server: ChatServer, case: str) -> None:
    token = REFUSED_TOKENS[case]()
    assert await _refusal_code(server, token=token) == 4001
    await _assert_nothing_stored(server)


async def test_expired_token_closes_4001_and_stores_nothing(server: ChatServer) -> None:
    assert await _refusal_code(server, token=_expired_token()) == 4001
    await _assert_nothing_stored(server)


async def test_token_expiring_during_the_connection_closes_it_4001(server: ChatServer) -> None:
    # exp has whole-second resolution: 2 s from now leaves at least 1 s to connect.
    token = jwt.encode(_claims(ttl_s=2), JWT_SECRET, algorithm="HS256")
    async with open_chat(server, "s-expiring", token=token) as client:
        assert await client.closed_code() == 4001


def _rs256_by_another_key() -> str:
    return jwt.encode(_claims(), _rsa_key(1), algorithm="RS256")


def _es256_by_another_key() -> str:
    return jwt.encode(_claims(), _ec_key(1), algorithm="ES256")


def _es256_against_rsa_key() -> str:
    return jwt.encode(_claims(), _ec_key(), algorithm="ES256")


def _hs256_signed_with_public_pem() -> str:
    return _hs256_with_key_text(_public_pem(_rsa_key()), _claims())


PUBLIC_KEY_REFUSALS: dict[str, Callable[[], str]] = {
    "rs256_by_another_key": _rs256_by_another_key,
    "es256_by_another_key": _es256_by_another_key,
    "es256_when_the_key_is_rsa": _es256_against_rsa_key,
    "hs256_signed_with_the_public_key": _hs256_signed_with_public_pem,
    "expired_rs256": lambda: jwt.encode(_claims(ttl_s=-60), _rsa_key(), algorithm="RS256"),
}


@pytest.mark.parametrize("with_secret", [True, False], ids=["with_secret", "public_key_only"])
@pytest.mark.parametrize("case", list(PUBLIC_KEY_REFUSALS))
async def test_token_not_signed_by_the_configured_key_closes_4001(
    start_server: StartServer, case: str, with_secret: bool
) -> None:
    server = await start_server(
        jwt_secret=JWT_SECRET if with_secret else None, jwt_public_key=_public_pem(_rsa_key())
    )
    assert await _refusal_code(server, token=PUBLIC_KEY_REFUSALS[case]()) == 4001
    await _assert_nothing_stored(server, token=jwt.encode(_claims(), _rsa_key(), algorithm="RS256"))


async def test_hs256_token_is_refused_when_only_a_public_key_is_configured(
    start_server: StartServer,
) -> None:
    server = await start_server(jwt_secret=None, jwt_public_key=_public_pem(_ec_key()))
    assert await _refusal_code(server, token=token_for("alice")) == 4001
    token = jwt.encode(_claims(), _ec_key(), algorithm="ES256")
    async with open_chat(server, "s1", token=token) as client:
        assert client.connected["resumed"] is False  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- ownership


async def test_session_belongs_to_its_first_user_another_user_gets_4003(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server, "owned", "alice") as client:
        await client.send(type="message", content="mine")
        await client.turn()
    assert await _refusal_code(server, "owned", token=token_for("bob")) == 4003
    # The refusal changed nothing: alice still owns it, with the same history.
    async with open_chat(server, "owned", "alice") as client:
        assert client.connected["resumed"] is True  # type: ignore[attr-defined]
        assert client.connected["history_length"] == 2  # type: ignore[attr-defined]
    assert len(fake.requests) == 1


async def test_another_user_is_refused_while_the_owner_is_connected(server: ChatServer) -> None:
    async with open_chat(server, "owned-live", "alice") as alice:
        assert await _refusal_code(server, "owned-live", token=token_for("bob")) == 4003
        await alice.send(type="ping")
        assert (await alice.receive())["type"] == "pong"


# --------------------------------------------------------------------------- session ids


@pytest.mark.parametrize(
    "session_id",
    [
        "x" * 129,
        "a%20b",
        "..%2F..%2Fetc",
        "a/b",
        "caf%C3%A9",  # café
        "%EF%BC%91",  # a full-width digit one
        "semi;colon",
        "",
    ],
    ids=[
        "129_chars",
        "space",
        "dot_dot_slash",
        "slash",
        "unicode",
        "fullwidth",
        "semicolon",
        "empty",
    ],
)
async def test_invalid_session_id_closes_4400(server: ChatServer, session_id: str) -> None:
    assert await _refusal_code(server, session_id, token=token_for("alice")) == 4400


async def test_session_id_of_128_allowed_characters_connects(server: ChatServer) -> None:
    session_id = ("Az09_-." * 19)[:128]
    async with open_chat(server, session_id) as client:
        assert client.connected["session_id"] == session_id  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- takeover


async def test_second_connection_takes_over_old_gets_4009_and_the_turn_goes_on_for_it(
    server: ChatServer, fake: FakeUpstream
) -> None:
    chunks = [f"w{n} " for n in range(60)]
    fake.enqueue(TextReply(chunks, delay_s=0.01))
    async with open_chat(server, "s-take", "alice") as old:
        await old.send(type="message", content="talk a lot", id="m1")
        seen = await old.receive_until("text_delta")
        async with open_chat(server, "s-take", "alice") as new:
            assert new.connected["resumed"] is True  # type: ignore[attr-defined]
            assert await old.closed_code() == 4009
            frames = await new.turn()
            await new.send(type="history")
            history = (await new.receive_until("history"))[-1]["messages"]
            assert server.connection_count == 1
    assert [f["type"] for f in frames[:2]] == ["typing", "response_start"]
    assert frames[1]["resumed"] is True and frames[1]["message_id"] == "m1"
    old_start = next(f for f in seen if f["type"] == "response_start")
    assert frames[1]["turn_id"] == old_start["turn_id"]  # the same turn, replayed
    # One delta with all of the text so far (at least what the old connection saw).
    assert frames[2]["type"] == "text_delta"
    assert frames[2]["content"].startswith(seen[-1]["content"])
    deltas = "".join(f["content"] for f in frames if f["type"] == "text_delta")
    end = next(f for f in frames if f["type"] == "response_end")
    assert deltas == end["full_content"] == "".join(chunks)
    assert end["status"] == "completed"
    assert not fake.requests[0].closed.is_set()  # the upstream request ran to its end
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", None),
        ("assistant", "completed"),
    ]


async def test_simultaneous_connections_of_one_user_leave_exactly_one_open(
    server: ChatServer,
) -> None:
    """Both handshakes are admitted concurrently (each awaits the store); whichever
    registers last takes the session over, the other is closed with 4009."""
    codes: list[int | None] = []
    clients: list[ChatClient] = []
    settled = trio.Event()  # three closed, and the fourth has its `connected`

    def check() -> None:
        if len(codes) == 3 and len(clients) == 1:
            settled.set()

    async def connect_and_wait() -> None:
        async with open_chat(server, "s-race", "alice") as client:
            clients.append(client)
            check()
            codes.append(await client.closed_code())
            clients.remove(client)
            check()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(connect_and_wait)
            await settled.wait()
            [survivor] = clients
            await survivor.ws.send_message('{"type": "ping"}')
            nursery.cancel_scope.cancel()
    assert codes == [4009, 4009, 4009]


# --------------------------------------------------------------------------- origin


ALLOWED_ORIGIN = "https://chat.example.com"


async def test_foreign_origin_closes_4003_and_stores_nothing(start_server: StartServer) -> None:
    server = await start_server(allowed_origins=(ALLOWED_ORIGIN,))
    headers = [("Origin", "https://evil.example.net")]
    assert await _refusal_code(server, token=token_for("alice"), headers=headers) == 4003
    await _assert_nothing_stored(server)


async def test_allowed_origin_connects(start_server: StartServer) -> None:
    server = await start_server(allowed_origins=(ALLOWED_ORIGIN, "https://other.example"))
    headers = [("Origin", ALLOWED_ORIGIN)]
    async with open_chat(server, "s-origin", headers=headers) as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]

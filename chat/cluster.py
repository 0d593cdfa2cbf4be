"""Several instances, one service (PROTOCOL.md, "Several instances"): what the
instances of one service share through Redis, and nothing else. Without
`--redis-url` none of this exists and the server is one process, as embedded.

What lives in Redis (every key under `chat:`)::

    chat:instance:{iid}      an instance's liveness (PX LIVENESS_MS, renewed every
                             RENEW_S); its absence means the instance is dead
    chat:control:{iid}       a stream of commands for that instance: stop, a tool
                             answer, a takeover (close that connection with 4009)
    chat:user:{uid}          the user's connections on every instance: a sorted set
                             of "{iid}/{connection}" scored by when each entry lapses
                             unless renewed (so a dead instance's entries expire)
    chat:attached:{sid}      which connection, on which instance, the session has
    chat:turn:{sid}          the session's turn lease: the instance that runs its
                             turns now, a fencing token, where its frames start
                             in the stream; renewed while the turns run
    chat:turns               the sessions with a turn lease, scored by the lease's
                             expiry: what a survivor sweeps when an instance dies
    chat:frames:{sid}        a stream of the session's turn frames, written by the
                             lease holder: a connection on another instance reads
                             the replay and the live frames as ONE read from the
                             turn's start, so nothing falls between them

Why streams and leases, not pub/sub (docs/operations.md, "Several instances"): a
subscriber that reconnects misses what was published meanwhile, and a plain pub/sub
bridge loses frames on a Redis restart; a stream is read from a position. A lease
with a fencing token lets a survivor tell a dead owner from a slow one: it stores a
dead instance's turn `interrupted` only when that instance's liveness key is gone.

coredis is imported inside the methods that use it: a server without `--redis-url`
never loads it (it costs about 13 MB of RSS).

Error handling: Redis is a peer like any other. Every call is time-boxed
(REDIS_CALL_TIMEOUT_S); a failure marks the cluster unavailable (new WebSockets get
1013, `/healthz` answers 503 degraded) and is retried by the monitor, and the
connections and turns this instance already has keep working on their own.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import coredis

import trio

import protocol as wire

log = logging.getLogger("chat.cluster")

# Every Redis call is bounded by this; a slower Redis counts as unreachable.
REDIS_CALL_TIMEOUT_S = 1.0
# An instance's liveness key lapses after this unless renewed; renewed every RENEW_S.
# A dead instance's turns are stored `interrupted` within LIVENESS_MS + SWEEP_S
# (the contract allows 15 s).
LIVENESS_MS = 8_000
RENEW_S = 2.0
SWEEP_S = 2.0
# A lease outlives its owner's liveness, so that a survivor still finds what it must
# store (and no one else takes the session's turns before it has); the survivor
# deletes it. Only if every instance is gone does it lapse by itself.
LEASE_KEEP_MS = 60_000
# A user's connection entry lapses after this unless its instance renews it.
CONNECTION_ENTRY_MS = 15_000
# How long a blocking stream read waits before it looks around again.
BLOCK_MS = 1_000
# Frames kept per session stream (approximately): several long answers.
MAX_STREAM_ENTRIES = 50_000
# How often a queued turn looks whether another instance's turn lease has gone.
LEASE_POLL_S = 0.05
# A finished turn's frames are kept this long for a late reader.
STREAM_RETENTION_S = 120
MAX_CONTROL_ENTRIES = 10_000

_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if ARGV[3] == '0' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW_LEASE = """
local lease = redis.call('HGET', KEYS[1], 'token')
if lease == false then
  -- Redis restarted empty: the lease is ours again, as it was.
  redis.call('HSET', KEYS[1], 'instance', ARGV[5], 'token', ARGV[1], 'start', ARGV[6])
  lease = ARGV[1]
end
if lease ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""
_RELEASE_LEASE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_ACQUIRE_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[3])
local start = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'f', '{}')
redis.call('HSET', KEYS[1], 'instance', ARGV[1], 'token', token, 'start', start)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return {token, start}
"""


class ClusterUnavailable(Exception):
    """Redis did not answer in time; the caller goes on as one instance would."""


@dataclass(frozen=True)
class TurnLease:
    """This instance's right to run a session's turns; `token` fences a late owner."""

    session_id: str
    token: int
    start: str  # the stream position where this lease's frames begin


@dataclass(frozen=True)
class RemoteTurn:
    """A session whose turns run on another instance, and where its frames start."""

    instance: str
    start: str


@dataclass(frozen=True)
class Command:
    """A command for this instance, from another: `op` is stop, tool or takeover."""

    op: str
    session_id: str
    fields: Mapping[str, str]


CommandHandler = Callable[[Command], None]
# A dead instance's turn: (session id, its lease's fields, its frames so far).
InterruptHandler = Callable[[str, Mapping[str, str], list[dict[str, Any]]], Awaitable[None]]


class Cluster:
    """This instance's view of the service; see the module docstring.

    Resource handling: `run` wraps the server's lifetime: it owns the Redis clients
    and, beside the server, keeps the liveness key and the leases renewed, reads
    this instance's commands, sweeps dead instances' turns and watches Redis.
    """

    def __init__(self, redis_url: str) -> None:
        self.instance_id = secrets.token_hex(6)
        self._url = redis_url
        self._redis: coredis.Redis[str] | None = None
        self._blocking: coredis.Redis[str] | None = None  # the command reader's own
        self.available = False
        self._became_available = trio.Event()
        self._leases: dict[str, TurnLease] = {}
        self._connections: dict[str, str] = {}  # member -> user id, renewed by `run`
        self._attached: dict[str, str] = {}  # session id -> holder, renewed by `run`

    # ------------------------------------------------------------------ lifetime

    async def run(
        self,
        body: Callable[[], Awaitable[None]],
        *,
        on_command: CommandHandler,
        on_dead_turn: InterruptHandler,
    ) -> None:
        """Run `body` (the server) with the cluster side of this instance around it:
        Redis is tried first (reachable or not: the monitor retries), and the Redis
        clients outlive `body`, so that its clean-up (turns stored, leases given back,
        connections withdrawn) still reaches Redis however it ends."""
        async with trio.open_nursery() as keeper:
            done_with_clients = trio.Event()
            await keeper.start(self._hold_clients, done_with_clients)
            try:
                await self._check()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._monitor)
                    nursery.start_soon(self._read_commands, on_command)
                    nursery.start_soon(self._sweep, on_dead_turn)
                    await body()
                    nursery.cancel_scope.cancel()
            finally:
                done_with_clients.set()

    async def _hold_clients(
        self, done: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the Redis clients and keep them until `done`. Shielded: coredis runs
        its connections in tasks of its own, which a cancellation of the server would
        otherwise end before the server's clean-up has used them."""
        import coredis
        redis = coredis.Redis.from_url(
            self._url,
            decode_responses=True,
            connect_timeout=REDIS_CALL_TIMEOUT_S,
            stream_timeout=None,
            retry_policy=coredis.retry.NoRetryPolicy(),
        )
        blocking = coredis.Redis.from_url(
            self._url,
            decode_responses=True,
            connect_timeout=REDIS_CALL_TIMEOUT_S,
            retry_policy=coredis.retry.NoRetryPolicy(),
        )
        with trio.CancelScope(shield=True):
            async with redis, blocking:
                self._redis, self._blocking = redis, blocking
                task_status.started()
                await done.wait()

    async def _call(self, request: Awaitable[Any]) -> Any:
        """One Redis call, time-boxed. Raises ClusterUnavailable (and marks it so)."""
        import coredis
        try:
            with trio.fail_after(REDIS_CALL_TIMEOUT_S):
                return await request
        except (trio.TooSlowError, coredis.exceptions.RedisError, OSError) as exc:
            if self.available:
                log.warning("redis unreachable (%s): refusing new connections", type(exc).__name__)
            self.available = False
            raise ClusterUnavailable(str(exc)) from None

    @property
    def _client(self) -> coredis.Redis[str]:
        assert self._redis is not None, "Cluster.run is not running"
        return self._redis

    async def check(self) -> bool:
        """Whether Redis answers now (what `/healthz` reports): a PING, or, while it
        was unreachable, the monitor's whole round, so that it says Redis is back only
        once this instance has told it again what it holds."""
        if not self.available:
            await self._check()
            return self.available
        try:
            await self._call(self._client.ping())
        except ClusterUnavailable:
            pass  # `_call` marked it unavailable
        return self.available

    async def _check(self) -> None:
        try:
            await self._call(self._client.ping())
            await self._renew_all()
        except ClusterUnavailable:
            return
        if not self.available:
            log.info("redis reachable: instance %s in service", self.instance_id)
        self.available = True

    async def _monitor(self) -> None:
        """Renew this instance's liveness, its connections and its leases; notice
        Redis going and coming back."""
        while True:
            await trio.sleep(RENEW_S)
            await self._check()

    async def _renew_all(self) -> None:
        import coredis
        now = _now_ms()
        await self._call(
            self._client.set(f"chat:instance:{self.instance_id}", "1", px=LIVENESS_MS)
        )
        for session_id, holder in list(self._attached.items()):
            # NX: a newer holder (a takeover on another instance) is never overwritten;
            # after Redis restarted empty, ours is back.
            await self._call(
                self._client.set(
                    f"chat:attached:{session_id}", holder, condition=coredis.PureToken.NX
                )
            )
        for member, user_id in list(self._connections.items()):
            await self._call(
                self._client.zadd(f"chat:user:{user_id}", {member: now + CONNECTION_ENTRY_MS})
            )
        for lease in list(self._leases.values()):
            renewed = await self._call(
                self._client.eval(
                    _RENEW_LEASE,
                    [f"chat:turn:{lease.session_id}", "chat:turns"],
                    [lease.token, LEASE_KEEP_MS, now + LIVENESS_MS, lease.session_id,
                     self.instance_id, lease.start],
                )
            )
            if not renewed:
                log.error("session %s: turn lease lost to another instance", lease.session_id)

    # ------------------------------------------------------------------ connections

    def _member(self, connection_key: str) -> str:
        return f"{self.instance_id}/{connection_key}"

    async def reserve_user_slot(
        self, user_id: str, connection_key: str, *, limit: int, takes_over: bool
    ) -> bool:
        """Count this connection against the user's limit on every instance. False:
        the user is at the limit. Raises ClusterUnavailable."""
        now = _now_ms()
        member = self._member(connection_key)
        reserved = await self._call(
            self._client.eval(
                _RESERVE,
                [f"chat:user:{user_id}"],
                [now, limit, int(takes_over), now + CONNECTION_ENTRY_MS, member,
                 CONNECTION_ENTRY_MS],
            )
        )
        if reserved:
            self._connections[member] = user_id
        return bool(reserved)

    async def release_user_slot(self, user_id: str, connection_key: str) -> None:
        member = self._member(connection_key)
        self._connections.pop(member, None)
        try:
            await self._call(self._client.zrem(f"chat:user:{user_id}", [member]))
        except ClusterUnavailable:
            pass  # the entry lapses by itself (CONNECTION_ENTRY_MS)

    async def attached_elsewhere(self, session_id: str, user_id: str) -> bool:
        """Whether a connection of this user holds the session on another instance."""
        holder = await self._call(self._client.get(f"chat:attached:{session_id}"))
        if not holder:
            return False
        instance, _, rest = str(holder).partition(" ")
        _, _, holder_user = rest.partition(" ")
        return instance != self.instance_id and holder_user == user_id

    async def attach(self, session_id: str, user_id: str, connection_key: str) -> None:
        """Record that this connection holds the session; a holder on another
        instance is told to close with 4009 (the takeover)."""
        value = f"{self.instance_id} {connection_key} {user_id}"
        self._attached[session_id] = value
        previous = await self._call(
            self._client.set(f"chat:attached:{session_id}", value, get=True)
        )
        if previous and previous != value:
            instance, _, rest = previous.partition(" ")
            old_key, _, _ = rest.partition(" ")
            if instance != self.instance_id:
                await self.send_command(instance, "takeover", session_id, connection=old_key)

    async def detach(self, session_id: str, user_id: str, connection_key: str) -> None:
        value = f"{self.instance_id} {connection_key} {user_id}"
        if self._attached.get(session_id) == value:
            del self._attached[session_id]
        try:
            await self._call(
                self._client.eval(_DELETE_IF_EQUAL, [f"chat:attached:{session_id}"], [value])
            )
        except ClusterUnavailable:
            pass

    # ------------------------------------------------------------------ commands

    async def send_command(self, instance: str, op: str, session_id: str, **fields: str) -> None:
        """Queue a command for `instance` (stop, tool, takeover). Raises
        ClusterUnavailable."""
        import coredis
        await self._call(
            self._client.xadd(
                f"chat:control:{instance}",
                {"op": op, "session": session_id, **fields},
                trim_strategy=coredis.PureToken.MAXLEN,
                threshold=MAX_CONTROL_ENTRIES,
                trim_operator=coredis.PureToken.APPROXIMATELY,
            )
        )

    async def _read_commands(self, on_command: CommandHandler) -> None:
        import coredis
        assert self._blocking is not None
        key = f"chat:control:{self.instance_id}"
        # A position in time, not "$": a command added while a read is being retried
        # (Redis restarting) is still read afterwards.
        position = f"{_now_ms()}-0"
        while True:
            try:
                with trio.fail_after(REDIS_CALL_TIMEOUT_S + BLOCK_MS / 1000):
                    answer = await self._blocking.xread({key: position}, block=BLOCK_MS)
            except (trio.TooSlowError, coredis.exceptions.RedisError, OSError):
                await trio.sleep(RENEW_S)  # the monitor reports it; try again later
                continue
            for entry in (answer or {}).get(key, ()):
                position = str(entry.identifier)
                fields = {str(name): str(value) for name, value in entry.field_values.items()}
                command = Command(fields.pop("op", ""), fields.pop("session", ""), fields)
                try:
                    on_command(command)
                except wire.ChatError as error:
                    log.info("command %s for session %s: %s", command.op, command.session_id,
                             error)

    # ------------------------------------------------------------------ turns

    async def acquire_turn(self, session_id: str) -> TurnLease:
        """Wait until no other instance runs this session's turns, then take the lease
        (a start marker goes into the stream with it). Raises ClusterUnavailable."""
        while True:
            now = _now_ms()
            acquired = await self._call(
                self._client.eval(
                    _ACQUIRE_LEASE,
                    [
                        f"chat:turn:{session_id}",
                        "chat:turns",
                        "chat:fencing",
                        f"chat:frames:{session_id}",
                    ],
                    [self.instance_id, LEASE_KEEP_MS, now + LIVENESS_MS, session_id,
                     MAX_STREAM_ENTRIES],
                )
            )
            if acquired:
                token, start = acquired
                lease = TurnLease(session_id, int(token), str(start))
                self._leases[session_id] = lease
                return lease
            # Another instance runs this session's turns: its lease goes when its
            # queue is done (or its instance dies and a sweep ends it).
            await trio.sleep(LEASE_POLL_S)

    async def describe_turn(self, lease: TurnLease, *, turn_id: str, reply_to: int) -> None:
        """Note the turn now running under `lease`, for a survivor that must store it."""
        await self._call(
            self._client.hset(
                f"chat:turn:{lease.session_id}", {"turn_id": turn_id, "reply_to": reply_to}
            )
        )

    async def release_turn(self, lease: TurnLease) -> None:
        self._leases.pop(lease.session_id, None)
        try:
            await self._call(
                self._client.eval(
                    _RELEASE_LEASE,
                    [f"chat:turn:{lease.session_id}", "chat:turns"],
                    [lease.token, lease.session_id],
                )
            )
            await self._call(
                self._client.expire(f"chat:frames:{lease.session_id}", STREAM_RETENTION_S)
            )
        except ClusterUnavailable:
            pass  # the lease lapses by itself; a survivor finds no dead owner

    async def remote_turn(self, session_id: str) -> RemoteTurn | None:
        """The session's turns run on another (live) instance: where and from where."""
        lease = await self._call(self._client.hgetall(f"chat:turn:{session_id}"))
        if not lease or lease.get("instance") == self.instance_id:
            return None
        return RemoteTurn(lease["instance"], lease["start"])

    async def end_session_everywhere(self, session_id: str, *, timeout_s: float) -> None:
        """Tell the instances that hold the session (its connection, its turns) to end
        it (4410, turn cancelled), and wait up to timeout_s for its turns to be over.
        Raises ClusterUnavailable."""
        holders: set[str] = set()
        attached = await self._call(self._client.get(f"chat:attached:{session_id}"))
        if attached:
            holders.add(str(attached).partition(" ")[0])
        remote = await self.remote_turn(session_id)
        if remote is not None:
            holders.add(remote.instance)
        holders.discard(self.instance_id)
        for instance in holders:
            await self.send_command(instance, "delete", session_id)
        # Another instance's turn ending is news in Redis only: look, a bounded number
        # of times.
        for _ in range(max(1, int(timeout_s / LEASE_POLL_S))):
            if await self.remote_turn(session_id) is None:
                return
            await trio.sleep(LEASE_POLL_S)

    async def turn_running(self, session_id: str) -> bool:
        """Whether some instance runs a turn of this session now."""
        return bool(await self._call(self._client.exists([f"chat:turn:{session_id}"])))

    async def publish(self, session_id: str, frames: list[str]) -> None:
        """Append frames (JSON text) to the session's stream, in order."""
        import coredis
        for frame in frames:
            await self._call(
                self._client.xadd(
                    f"chat:frames:{session_id}",
                    {"f": frame},
                    trim_strategy=coredis.PureToken.MAXLEN,
                    threshold=MAX_STREAM_ENTRIES,
                    trim_operator=coredis.PureToken.APPROXIMATELY,
                )
            )

    async def read_frames(
        self, session_id: str, after: str, *, block: bool
    ) -> list[tuple[str, dict[str, Any]]]:
        """The frames after stream position `after`: (position, frame) pairs; with
        `block`, waits up to BLOCK_MS for the first. Raises ClusterUnavailable."""
        key = f"chat:frames:{session_id}"
        if block:
            answer = await self._call_blocking(self._client.xread({key: after}, block=BLOCK_MS))
            entries = (answer or {}).get(key, ())
        else:
            entries = await self._call(self._client.xrange(key, f"({after}", "+"))
        frames: list[tuple[str, dict[str, Any]]] = []
        for entry in entries:
            document = json.loads(dict(entry.field_values)["f"])
            if document:  # not a lease's start marker
                frames.append((entry.identifier, document))
        return frames

    async def _call_blocking(self, request: Awaitable[Any]) -> Any:
        import coredis
        try:
            with trio.fail_after(REDIS_CALL_TIMEOUT_S + BLOCK_MS / 1000):
                return await request
        except (trio.TooSlowError, coredis.exceptions.RedisError, OSError) as exc:
            raise ClusterUnavailable(str(exc)) from None

    async def _sweep(self, on_dead_turn: InterruptHandler) -> None:
        """Find turns whose instance died, and hand each to exactly one survivor."""
        while True:
            await trio.sleep(SWEEP_S)
            try:
                await self._sweep_once(on_dead_turn)
            except ClusterUnavailable:
                continue

    async def _sweep_once(self, on_dead_turn: InterruptHandler) -> None:
        import coredis
        lapsed = await self._call(
            self._client.zrange(
                "chat:turns", float("-inf"), _now_ms(), sortby=coredis.PureToken.BYSCORE
            )
        )
        for session_id in lapsed:
            lease = await self._call(self._client.hgetall(f"chat:turn:{session_id}"))
            owner = lease.get("instance") if lease else None
            if owner and await self._call(self._client.exists([f"chat:instance:{owner}"])):
                continue  # slow, not dead: its monitor renews the lease
            if not await self._call(self._client.zrem("chat:turns", [session_id])):
                continue  # another survivor took it
            if not lease:
                continue  # lapsed between the two reads: nothing left to end
            frames = [f for _, f in await self.read_frames(session_id, lease["start"], block=False)]
            log.warning("session %s: its instance died mid-turn; storing it", session_id)
            await on_dead_turn(session_id, lease, frames)
            await self._call(self._client.delete([f"chat:turn:{session_id}"]))


def _now_ms() -> int:
    return int(time.time() * 1000)

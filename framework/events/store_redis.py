"""The shared engine (MTP_REDIS_URL): a Redis stream per tenant with one consumer group.

Every replica's framework workers and every ``mtp worker`` are consumers of the group
``deliver`` on ``mtp:{tenant}:events`` (under the tenant's own key prefix, which its
Redis ACL user and the offboarding purge cover); each stream entry is one delivery (an event and
one route). ``XREADGROUP`` hands an entry to one consumer; while it runs, the consumer
keeps it fresh (``XCLAIM`` to itself, which resets its idle time); a consumer that died
stops doing so, and ``XAUTOCLAIM`` moves its entries to a live consumer once idle
longer than :data:`LEASE` (at-least-once). Per route and subject a list holds the
entry ids in publish order; only its head may run, so the same subject reaches a
route one at a time and in order, whichever consumer holds the entries. A retry is a
new entry (with ``not_before``) that takes its predecessor's place in that list; a
dead letter moves to a hash. The publish, each outcome and a replay are Lua scripts:
atomic, so a crash never leaves an order list pointing at nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from framework.events.binding import Event
from framework.events.config import EventRoute
from framework.events.store import DEAD, DEDUP_SECONDS, DONE, DeadLetter, Delivery, Publisher

GROUP = "deliver"
LEASE = 10.0  # seconds an entry may go unrefreshed before another consumer takes it
MAX_HELD = 1000  # entries this consumer holds waiting (order, backoff) before reading more
# A consumer with nothing in hand waits this long inside XREADGROUP for a new entry
# (every worker of every tenant is a consumer: polling cost CPU with nothing to do);
# short, so a graceful stop is not held up for long.
IDLE_BLOCK = 0.5
AUTOCLAIM_SECONDS = 1.0  # how often entries of dead consumers are looked for (LEASE is 10)

PUBLISH = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
for i = 3, #KEYS do
  local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[i])
  if KEYS[i] ~= KEYS[1] then redis.call('RPUSH', KEYS[i], id) end
end
return 1
"""
# KEYS: stream, order list (or the stream: none); ARGV: id, outcome, next entry, dead key,
# dead record
FINISH = """
redis.call('XACK', KEYS[1], 'deliver', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local has_order = KEYS[2] ~= KEYS[1]
if ARGV[2] == 'pending' then
  local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[3])
  if has_order then
    local at = redis.call('LPOS', KEYS[2], ARGV[1])
    if at then redis.call('LSET', KEYS[2], at, id) else redis.call('LPUSH', KEYS[2], id) end
  end
  return id
end
if has_order then redis.call('LREM', KEYS[2], 1, ARGV[1]) end
if ARGV[2] == 'dead' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[4]) end
return ARGV[1]
"""
# KEYS: stream, dead hash, order list (or the stream); ARGV: dead id, entry
REPLAY = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[2])
if KEYS[3] ~= KEYS[1] then redis.call('RPUSH', KEYS[3], id) end
return 1
"""


@dataclass
class _Held:
    entry: dict[str, Any]
    key: str  # its order list (the stream: none), worked out once, not on every poll
    running: bool = False


@dataclass
class RedisEventStore:
    """Events of one tenant in Redis; one instance per process (it is one consumer)."""

    client: Redis
    tenant: str
    held: dict[str, _Held] = field(default_factory=dict)
    lease: float = LEASE

    def __post_init__(self) -> None:
        base = f"mtp:{self.tenant}:events"
        self.stream, self.dead_key, self.base = base, f"{base}:dead", base
        self._grouped = False  # made on first use: a process may start while Redis is away
        self._autoclaimed = 0.0  # time.monotonic() of the last XAUTOCLAIM
        self._publish = self.client.register_script(PUBLISH)
        self._finish = self.client.register_script(FINISH)
        self._replay = self.client.register_script(REPLAY)

    def _order_key(self, route: EventRoute, subject: str | None) -> str:
        return f"{self.base}:order:{route.key()}:{subject}" if subject is not None else self.stream

    def publish(self, event: Event, publisher: Publisher, routes: list[EventRoute]) -> bool:
        """Like EventStore.publish: False for a duplicate id+source within 24 h."""
        now = time.time()
        seen = f"{self.base}:seen:{len(event.source)}:{event.source}:{event.id}"
        keys, args = [self.stream, seen], [str(DEDUP_SECONDS), ""]
        for route in routes:
            keys.append(self._order_key(route, event.subject))
            args.append(json.dumps({
                "event": _event_dict(event), "publisher": _publisher_dict(publisher),
                "route": route.snapshot(), "published": now, "attempts": 0,
                "not_before": 0}))
        return bool(self._publish(keys=keys, args=args))

    def _group(self) -> None:
        """The consumer group, created once Redis answers (XREADGROUP needs it)."""
        if self._grouped:
            return
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped = True

    def claim(self, owner: str, limit: int, lease: float) -> list[Delivery]:
        """Read new entries and those of dead consumers; the due ones, now running."""
        if len(self.held) < MAX_HELD:
            self._group()
            # Nothing in hand (running or waiting its turn): nothing here can become due
            # but a new entry, and Redis hands that to a blocked reader at once.
            block = None if self.held else int(IDLE_BLOCK * 1000)
            try:
                # Only as many as it can run: entries left in the stream go to whichever
                # consumer is free (entries waiting for their turn are read on past).
                for _, entries in self.client.xreadgroup(GROUP, owner, {self.stream: ">"},
                                                         count=max(limit, 1),
                                                         block=block) or []:
                    self._hold(entries)
                if time.monotonic() - self._autoclaimed >= AUTOCLAIM_SECONDS:
                    _, entries, *_ = self.client.xautoclaim(self.stream, GROUP, owner,
                                                            int(self.lease * 1000), "0-0",
                                                            count=64)
                    self._autoclaimed = time.monotonic()
                    self._hold(entries)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # a Redis that lost its data: made again next time
                    self._grouped = False
                raise
        now = time.time()
        ready = [(entry_id, held) for entry_id, held in self.held.items()
                 if not held.running and held.entry["not_before"] <= now]
        ordered = list(dict.fromkeys(h.key for _, h in ready if h.key != self.stream))
        heads: dict[str, str | None] = {}
        if ordered:  # one round trip for the heads of every subject in question
            pipe = self.client.pipeline(transaction=False)
            for key in ordered:
                pipe.lindex(key, 0)
            heads = {key: _text(head) if head is not None else None
                     for key, head in zip(ordered, pipe.execute(), strict=True)}
        due = []
        for entry_id, held in ready:
            if len(due) >= limit:
                break
            if held.key != self.stream and heads.get(held.key) not in (None, entry_id):
                continue  # an earlier event of the subject is not done yet
            held.running = True
            due.append(self._delivery(entry_id, held.entry))
        return due

    def _hold(self, entries: list[Any]) -> None:
        for entry_id, fields in entries or []:
            if not fields:  # deleted meanwhile (done by a consumer that was thought dead)
                self.client.xack(self.stream, GROUP, entry_id)
                continue
            eid = _text(entry_id)
            if eid not in self.held:
                entry = json.loads(fields[b"d"])
                self.held[eid] = _Held(entry, self._order_key(
                    EventRoute.from_snapshot(entry["route"]), entry["event"]["subject"]))

    def _delivery(self, entry_id: str, entry: dict[str, Any]) -> Delivery:
        ev, who = entry["event"], entry["publisher"]
        return Delivery(
            entry_id,  # type: ignore[arg-type]
            Event(ev["id"], ev["source"], ev["type"], ev["subject"], ev["time"], ev["data"],
                  ev.get("extra", {})),
            EventRoute.from_snapshot(entry["route"]),
            Publisher(who["user"], tuple(who["groups"]), tuple(who["roles"]),
                      who["auth_method"], who["request_id"]),
            entry["attempts"] + 1, entry["published"])

    def finish(self, did: Any, owner: str, status: str, error: str = "",
               next_at: float = 0.0) -> None:
        held = self.held.pop(str(did), None)
        if held is None:
            return
        entry, key = held.entry, held.key
        attempts = entry["attempts"] + 1
        following = json.dumps({**entry, "attempts": attempts, "not_before": next_at})
        record = json.dumps({**entry, "attempts": attempts, "error": error[:500],
                             "updated": time.time()})
        outcome = status if status in (DONE, DEAD) else "pending"
        self._finish(keys=[self.stream, key, self.dead_key],
                     args=[str(did), outcome, following, record])

    def renew(self, owner: str, lease: float) -> None:
        """Reset the idle time of every entry this consumer holds (it is alive)."""
        ids = list(self.held)
        for start in range(0, len(ids), 200):
            self.client.xclaim(self.stream, GROUP, owner, 0, ids[start:start + 200],
                               justid=True)

    def release(self, owner: str) -> int:
        """A graceful stop: the held entries go back to the group for another consumer."""
        ids = list(self.held)
        self.held.clear()
        if ids:
            # Idle at once: the next XAUTOCLAIM of any consumer takes them.
            self.client.xclaim(self.stream, GROUP, owner, 0, ids, idle=int(self.lease * 1000) + 1,
                               justid=True)
        return len(ids)

    def dead(self, limit: int = 100) -> list[DeadLetter]:
        letters = []
        for did, raw in self.client.hgetall(self.dead_key).items():
            entry = json.loads(raw)
            d = self._delivery(_text(did), entry)
            letters.append(DeadLetter(_text(did), d.event, d.route,  # type: ignore[arg-type]
                                      entry["attempts"], entry["error"], entry["updated"]))
        letters.sort(key=lambda d: -d.updated)
        return letters[:limit]

    def replay(self, did: Any) -> bool:
        raw = self.client.hget(self.dead_key, str(did))
        if raw is None:
            return False
        entry = json.loads(raw)
        key = self._order_key(EventRoute.from_snapshot(entry["route"]),
                              entry["event"]["subject"])
        fresh = {k: v for k, v in entry.items() if k not in ("error", "updated")}
        fresh.update(attempts=0, not_before=0)
        return bool(self._replay(keys=[self.stream, self.dead_key, key],
                                 args=[str(did), json.dumps(fresh)]))

    def prune(self, keep: float) -> None:
        """Nothing to do: entries are deleted when done, dedup keys expire by themselves."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event_dict(event: Event) -> dict[str, Any]:
    return {**event.public(), "extra": event.extra}


def _publisher_dict(p: Publisher) -> dict[str, Any]:
    return {"user": p.user, "groups": list(p.groups), "roles": list(p.roles),
            "auth_method": p.auth_method, "request_id": p.request_id}

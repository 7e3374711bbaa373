"""The schedule: the one rate-limit algorithm, as pure functions over one token's state.

Every limiter store (this process, every process of the host, every host through Redis) keeps
one ``TokenState`` per token and applies these functions to it atomically, with the store's own
clock as ``now``: the memory store under a lock, the host store in one SQLite transaction
(``BEGIN IMMEDIATE``), Redis with a compare-and-set. The waiting, queueing and sending around
it live in ``_ratelimit.Limiter``; this module neither waits nor does I/O.

The rules
---------

``g = period / requests x (1 + margin)`` is the spacing; ``tol = period / requests x margin / 2``.

1. **One grant at a time.** A grant is permission for one request to be written. At most one is
   outstanding per token: the next is made only once the holder reported its write (``sent``),
   gave the grant back unused (``release``), or its lease ran out.
2. **A grant is made only when due**: never before ``max(due, pause)`` on the store's clock. No
   reservation is made ahead of time, so nothing made ahead can fail to move when a send is late.
3. **A start is dated no earlier than the real write**: at the store's clock when it is
   reported, or, earlier and closer, at the grant's time on the store's clock plus the time the
   holder measured on its own clock from asking for the grant to writing (the store granted
   after the holder asked, so this is still no earlier than the write). ``due`` becomes
   ``max(d, start - tol) + g``, with ``d`` the due time the grant was made for: lateness up to
   ``tol`` (a timer firing late, a round trip) never moves the schedule, and more moves it only
   by the excess, so small delays do not add up.
4. **A lease that runs out counts as a start at its end.** The holder renews its lease while it
   connects, and checks it on its own clock, synchronously, just before it writes: a holder whose
   loop stalled past its lease never writes, and one that crashed never renews. Either way the
   store may assume the worst, a write at the very end of the lease, and spaces the next grant
   from there.
5. **A pause** (a 429's ``Retry-After``) moves the earliest grant of every process.
6. **Order.** Each limiter reports, per lane, how many of its callers wait and when its oldest
   one arrived. A due grant goes to the oldest waiter of the interactive lane, across every
   process; to the background lane only when no interactive call waits, or when background
   work has waited through ``share - 1`` interactive grants in a row (its minimum share).
   Order decides only *who* gets a grant, never *when*: it cannot affect the guarantee below.
   A report (or a limiter's registration) that still says the same and stands for at least
   half its grace more is kept as it is: asking again (a poll) changes nothing, so a store
   writes nothing. A store may also keep reports beside the state and write them without
   comparing (Redis does): a grant decided on a report one round trip old is still made only
   when due.
7. **Retries are recognised.** Asking again for a grant with the ticket that already holds it
   (an answer lost after the store committed) is answered "granted", to the same lane.

Why ``requests + 1`` starts cannot happen within ``period``
-----------------------------------------------------------

Take two consecutive real starts ``a`` then ``b`` (writes to the socket). By rule 1, ``b``'s
grant was made after ``a``'s holder reported, gave up, or expired. If it reported, with ``a``
dated ``r ≥ a`` (rule 3), the due time set then is at least ``r - tol + g ≥ a + g - tol``;
if its lease expired at ``e`` (rule 4), ``a < e`` and the due time
is ``e + g``. By rule 2, ``b ≥ due``. So any two consecutive starts are at least
``g - tol = period / requests x (1 + margin / 2)`` apart, and ``requests + 1`` starts span at
least ``period x (1 + margin / 2)``: more than ``period``, with ``margin / 2`` left for network
jitter. The same gap makes a strict no-burst leaky bucket (nginx ``limit_req`` without
``burst``) accept every request.

This holds for any number of processes, loops and threads (they all go through the store), for
late sends (the start is the write, reported after it), cancellation (an unused grant is given
back; a lost one expires), crashes between grant and write (rule 4) and pauses (rule 5). Clock
steps: the memory and host stores use the system's monotonic clock, which never steps; the Redis
store uses Redis's ``TIME``, and a forward step of that clock by more than ``tol`` is the one
thing that can shorten a gap across processes (NTP slews, it does not step, once synchronised).

A store that lost its state (Redis flushed or restarted, the host database deleted) forgets other
processes' starts; each process also keeps its own last start and pause, and never starts
sooner than they allow, so one process alone always keeps the limit.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from ._models import RateLimit

__all__ = [
    "BACKGROUND",
    "INTERACTIVE",
    "Grant",
    "Lane",
    "Peek",
    "RateConflict",
    "Rules",
    "TokenState",
    "adopt",
    "grant",
    "pause",
    "peek",
    "release",
    "renew",
    "same_schedule",
    "sent",
    "unregister",
    "withdraw",
]

_NEVER = -math.inf
INTERACTIVE = 0
BACKGROUND = 1
#: How long a limiter's report of its queue stands after the moment it said it would ask again:
#: a process that stalled or died stops holding others back after this.
QUEUE_GRACE = 1.0


@attrs.frozen
class Rules:
    """What the schedule needs of a ``RateLimit``, computed once per limiter."""

    rate_limit: RateLimit
    interval: float  #: g: spacing between starts, margin included
    tolerance: float  #: lateness absorbed without moving the schedule
    lease: float  #: how long a grant stays valid without a renewal
    user_ttl: float  #: how long a limiter counts as using the token after its last call
    share: int  #: background gets at least one grant in ``share`` while it waits (0: none)

    @classmethod
    def of(cls, rate_limit: RateLimit, *, lease: float, share: int = 5) -> Rules:
        spacing = rate_limit.period / rate_limit.requests
        return cls(
            rate_limit,
            interval=rate_limit.interval,
            tolerance=spacing * rate_limit.margin / 2,
            lease=lease,
            user_ttl=max(60.0, 2 * rate_limit.period + lease),
            share=share,
        )

    @property
    def min_gap(self) -> float:
        """The shortest gap between two starts this schedule allows."""
        return self.interval - self.tolerance


class RateConflict(Exception):
    """Another live limiter uses this token with another rate limit."""

    def __init__(self, theirs: RateLimit, where: str) -> None:
        super().__init__(theirs, where)
        self.theirs = theirs
        self.where = where


@attrs.frozen
class Lane:
    """One lane of one limiter's queue, as it reports it: for order and predictions."""

    waiting: int  #: callers waiting in this lane
    head: float  #: when the oldest of them arrived (store clock)
    newest: float  #: when the newest arrived
    after: float  #: when the second oldest arrived (the head once the oldest is served)

    def served(self) -> Lane | None:
        """This lane once its oldest caller got a grant."""
        if self.waiting <= 1:
            return None
        return Lane(self.waiting - 1, self.after, self.newest, self.after)


@attrs.define
class TokenState:
    """One token's schedule, in the store's clock (seconds)."""

    due: float = _NEVER  #: the earliest the next grant may be made
    pause: float = _NEVER  #: the end of the last 429's Retry-After
    last: float = _NEVER  #: the last recorded start
    holder: str | None = None  #: the outstanding grant's ticket
    holder_lane: int = INTERACTIVE  #: the lane the outstanding grant was made to
    lease: float = _NEVER  #: when the outstanding grant runs out
    scheduled: float = _NEVER  #: the due time the outstanding grant was made for
    granted: float = _NEVER  #: when the outstanding grant was made
    streak: int = 0  #: interactive grants in a row while background work waited
    #: limiter -> [requests, period, margin, description, expiry]: who uses the token at what rate
    users: dict[str, list[Any]] = attrs.field(factory=dict)
    #: limiter -> [interactive lane, background lane, expiry]; a lane is [waiting, head, newest]
    queued: dict[str, list[Any]] = attrs.field(factory=dict)
    #: The store could not read this token's state (never stored): one period of caution.
    suspect: bool = False

    # ------------------------------------------------------------------ storage

    def to_json(self) -> dict[str, Any]:
        return {
            "due": _out(self.due),
            "pause": _out(self.pause),
            "last": _out(self.last),
            "holder": self.holder,
            "holder_lane": self.holder_lane,
            "lease": _out(self.lease),
            "scheduled": _out(self.scheduled),
            "granted": _out(self.granted),
            "streak": self.streak,
            "users": self.users,
            "queued": self.queued,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenState:
        holder = data.get("holder")
        return cls(
            due=_in(data.get("due")),
            pause=_in(data.get("pause")),
            last=_in(data.get("last")),
            holder=None if holder is None else str(holder),
            holder_lane=int(data.get("holder_lane") or INTERACTIVE),
            lease=_in(data.get("lease")),
            scheduled=_in(data.get("scheduled")),
            granted=_in(data.get("granted")),
            streak=int(data.get("streak") or 0),
            users={str(k): _user(v) for k, v in (data.get("users") or {}).items()},
            queued={str(k): _queued(v) for k, v in (data.get("queued") or {}).items()},
        )

    def latest(self) -> float:
        """The latest time this state still constrains anything; past it, it can be dropped."""
        times = [self.due, self.pause, self.lease if self.holder is not None else _NEVER]
        times.extend(float(entry[-1]) for entry in self.users.values())
        times.extend(float(entry[-1]) for entry in self.queued.values())
        return max(times)

    def newest(self) -> float:
        """The newest time recorded: a clock that reads far earlier was reset (a reboot)."""
        return max(self.due, self.pause, self.last, self.lease)


def _out(value: float) -> float | None:
    return None if value == _NEVER else value


def _in(value: Any) -> float:
    if value is None:
        return _NEVER
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a time: {value!r}")
    return number


def _user(value: Any) -> list[Any]:
    """A ``users`` entry as stored, checked: anything else is not a state of ours."""
    requests, period, margin, where, expiry = value
    count, seconds, share = int(requests), _in(period), _in(margin)
    if count < 1 or seconds <= 0 or not 0 <= share < 1:
        raise ValueError(f"not a rate: {value!r}")
    return [count, seconds, share, str(where), _in(expiry)]


def _queued(value: Any) -> list[Any]:
    interactive, background, expiry = value
    lanes: list[Any] = []
    for lane in (interactive, background):
        if lane is None:
            lanes.append(None)
            continue
        waiting, head, newest, after = lane
        lanes.append([int(waiting), _in(head), _in(newest), _in(after)])
    return [*lanes, _in(expiry)]


def _rate_of(entry: list[Any]) -> RateLimit:
    return RateLimit(int(entry[0]), float(entry[1]), margin=float(entry[2]))


def _lane(entry: list[Any], lane: int) -> Lane | None:
    value = entry[lane]
    if not value:
        return None
    return Lane(int(value[0]), float(value[1]), float(value[2]), float(value[3]))


# ---------------------------------------------------------------------- operations


#: The longest lease a limiter may ask for, and the longest pause a store keeps: the bounds
#: of every time read from a store (a state a bug or another program wrote cannot stall a
#: token for longer than this).
MAX_LEASE = 600.0
MAX_PAUSE = 3600.0


def _bound(state: TokenState, now: float, rules: Rules) -> None:
    """Bring every time of a state read from a store within what this schedule could have
    written, so that nothing stored can stall or refuse a token for good. A state that could
    not be read at all (``suspect``) waits one whole period (+ margin): nobody knows how many
    starts that period already holds."""
    rate = rules.rate_limit
    window = rate.period * (1 + rate.margin)
    if state.suspect:
        state.due = max(state.due, now + window)
        state.suspect = False
    state.pause = min(state.pause, now + MAX_PAUSE)
    state.lease = min(state.lease, now + MAX_LEASE)
    state.last = min(state.last, now + MAX_LEASE)
    state.due = min(state.due, max(now, state.pause) + MAX_LEASE + 2 * window)
    state.streak = min(max(state.streak, 0), 1 << 16)
    user_ttl = max(60.0, 2 * rate.period + MAX_LEASE)
    for entry in state.users.values():
        entry[-1] = min(float(entry[-1]), now + user_ttl)
    horizon = max(now, state.due, state.pause) + MAX_LEASE + rules.interval + QUEUE_GRACE
    for entry in state.queued.values():
        entry[-1] = min(float(entry[-1]), horizon)


def _settle(state: TokenState, now: float, rules: Rules) -> None:
    """Expire a lost grant (rule 4) and the entries of limiters that went away."""
    _bound(state, now, rules)
    if state.holder is not None and now >= state.lease:
        state.last = max(state.last, state.lease)
        state.due = max(state.due, state.lease + rules.interval)
        state.holder = None
    for table in (state.users, state.queued):
        for who in [who for who, entry in table.items() if float(entry[-1]) <= now]:
            del table[who]


def same_schedule(a: RateLimit, b: RateLimit) -> bool:
    """True when limiters at ``a`` and at ``b`` may share a token: the same rate (5/60s and
    1/12s are one, spaced 12 s apart) and the same margin. The schedule is made of the spacing
    ``g`` and the tolerance alone (rule 2, 3), so such limiters space every start alike, and
    each one's guarantee holds; another margin spaces starts differently."""
    return a.same_rate(b) and math.isclose(a.margin, b.margin)


def _check_rate(state: TokenState, now: float, rules: Rules, who: str, where: str) -> None:
    mine = rules.rate_limit
    changed = False
    for other, entry in state.users.items():
        if not same_schedule(_rate_of(entry), mine):
            if other != who:
                raise RateConflict(_rate_of(entry), str(entry[3]))
            changed = True
    if changed or (not state.users and state.due > now):
        # Nobody else uses the token: the new rate spaces the next start from the last one.
        state.due = min(state.due, state.last + rules.interval)
    entry = [mine.requests, mine.period, mine.margin, where, now + rules.user_ttl]
    if not _fresh(state.users.get(who), entry, now, rules.user_ttl / 2):
        state.users[who] = entry


def _fresh(old: list[Any] | None, new: list[Any], now: float, keep: float) -> bool:
    """True when the entry stored (``old``) says what ``new`` says and stands at least ``keep``
    seconds more: it is then kept as it is, so that asking again (a poll) writes nothing. Only
    real changes are written; an expiry is renewed once half of its grace has passed."""
    return (
        old is not None
        and old[:-1] == new[:-1]
        and float(old[-1]) >= min(float(new[-1]), now + keep)
    )


@attrs.frozen
class Grant:
    """The answer to ``grant``: granted to a lane, or how long until it is worth asking again."""

    granted: bool
    lane: int = INTERACTIVE  #: the lane granted
    wait: float = 0.0  #: seconds until the earliest next grant (not granted)
    held: bool = False  #: another grant is outstanding: ask again once it is reported
    behind: bool = False  #: due, but an older or more urgent caller elsewhere goes first


def _first(state: TokenState, lane: int) -> tuple[float, str] | None:
    heads = [
        (found.head, who)
        for who, entry in state.queued.items()
        if (found := _lane(entry, lane)) is not None and found.waiting > 0
    ]
    return min(heads) if heads else None


def grant(
    state: TokenState,
    now: float,
    rules: Rules,
    *,
    who: str,
    where: str,
    ticket: str,
    lanes: tuple[Lane | None, Lane | None],
) -> Grant:
    """Make the grant ``ticket`` to one of ``who``'s lanes, if due and its turn (rules 1, 2, 6).

    ``who`` is the asking limiter (one per process, event loop and limiter object), ``lanes``
    its queue (interactive, background) as it stands, the asker included.
    """
    _settle(state, now, rules)
    if state.holder == ticket:
        # Already ours: a retry of this grant whose write committed but whose answer was lost.
        return Grant(True, lane=state.holder_lane)
    _check_rate(state, now, rules, who, where)
    earliest = max(state.due, state.pause)
    _report(state, now, who, lanes, now + max(0.0, earliest - now) + QUEUE_GRACE)
    if state.holder is not None:
        return Grant(False, wait=max(earliest, state.lease) - now, held=True)
    if earliest > now:
        return Grant(False, wait=earliest - now)
    interactive = _first(state, INTERACTIVE)
    background = _first(state, BACKGROUND)
    owed = background is not None and rules.share > 0 and state.streak >= rules.share - 1
    first = background if interactive is None or owed else interactive
    lane = BACKGROUND if first is background else INTERACTIVE
    if first is None or first[1] != who:
        return Grant(False, wait=0.0, behind=first is not None)
    state.holder = ticket
    state.holder_lane = lane
    state.lease = now + rules.lease
    state.scheduled = earliest
    state.granted = now
    state.streak = 0 if lane == BACKGROUND else state.streak + (background is not None)
    left = list(lanes)
    served = left[lane]
    left[lane] = None if served is None else served.served()
    # The next head asks once this grant is reported and one gap has passed.
    _report(state, now, who, (left[0], left[1]), now + rules.lease + rules.interval + QUEUE_GRACE)
    return Grant(True, lane=lane)


def _report(
    state: TokenState, now: float, who: str, lanes: tuple[Lane | None, Lane | None], until: float
) -> None:
    if not any(lane is not None and lane.waiting > 0 for lane in lanes):
        state.queued.pop(who, None)
        return
    entry: list[Any] = [
        None
        if lane is None or not lane.waiting
        else [lane.waiting, lane.head, lane.newest, lane.after]
        for lane in lanes
    ]
    entry.append(until)
    if not _fresh(state.queued.get(who), entry, now, QUEUE_GRACE / 2):
        state.queued[who] = entry


def sent(
    state: TokenState, now: float, rules: Rules, *, ticket: str, elapsed: float | None = None
) -> None:
    """The holder of ``ticket`` wrote its request: record the start (rule 3).

    ``elapsed``: seconds the holder measured from asking for the grant to writing.
    """
    _settle(state, now, rules)
    if state.holder != ticket:
        return  # the lease ran out first: _settle counted the start at its end
    start = now if elapsed is None else min(now, state.granted + max(0.0, elapsed))
    # Up to tol of lateness never moves the schedule; beyond it, only the excess does.
    state.due = max(state.due, max(state.scheduled, start - rules.tolerance) + rules.interval)
    state.last = max(state.last, start)
    state.holder = None


def release(state: TokenState, now: float, rules: Rules, *, ticket: str) -> None:
    """The holder of ``ticket`` gives its grant back: nothing was written."""
    _settle(state, now, rules)
    if state.holder == ticket:
        state.holder = None


def renew(state: TokenState, now: float, rules: Rules, *, ticket: str) -> bool:
    """Extend the lease of ``ticket`` (a slow connect); False if it was already lost."""
    _settle(state, now, rules)
    if state.holder != ticket:
        return False
    state.lease = now + rules.lease
    return True


def pause(state: TokenState, now: float, rules: Rules, *, seconds: float) -> float:
    """No grant for ``seconds`` (rule 5); returns how long the pause now lasts."""
    _settle(state, now, rules)
    state.pause = max(state.pause, now + seconds)
    return state.pause - now


def unregister(state: TokenState, now: float, rules: Rules, *, who: str) -> None:
    """The limiter ``who`` is closed: it no longer uses the token, nor waits."""
    _settle(state, now, rules)
    state.users.pop(who, None)
    state.queued.pop(who, None)


def withdraw(state: TokenState, now: float, rules: Rules, *, who: str) -> None:
    """Nobody waits in ``who``'s queue any more (its last waiters gave up): say so at once,
    or its report would hold every other process back until it expires."""
    _settle(state, now, rules)
    state.queued.pop(who, None)


def adopt(state: TokenState, now: float, rules: Rules, *, who: str, where: str) -> str | None:
    """``who`` switches to ``rules``' rate, if no other live limiter uses the token: its next
    start is spaced from the last one at the new rate. Returns where another one runs (then
    nothing changes: one rate per token)."""
    _settle(state, now, rules)
    for other, entry in state.users.items():
        if other != who:
            return str(entry[3])
    mine = rules.rate_limit
    state.users[who] = [mine.requests, mine.period, mine.margin, where, now + rules.user_ttl]
    if state.last != _NEVER:
        state.due = state.last + rules.interval
    return None


@attrs.frozen
class Peek:
    """What a newcomer can know before queueing: for ``max_wait`` predictions."""

    free_in: float  #: seconds until the next grant could be made at the earliest
    ahead: int  #: calls elsewhere that will be served before a newcomer of the lane asked
    paused_for: float  #: seconds of a 429's pause left


def peek(state: TokenState, now: float, rules: Rules, *, who: str, lane: int) -> Peek:
    """Read, for a newcomer to ``who``'s ``lane``; nothing that matters changes."""
    _settle(state, now, rules)
    free = max(state.due, state.pause)
    if state.holder is not None:
        # The holder starts now at the earliest: the next grant is one gap after that.
        free = max(free, now + rules.min_gap)
    counts = [0, 0]
    for other, entry in state.queued.items():
        if other == who:
            continue
        for index in (INTERACTIVE, BACKGROUND):
            found = _lane(entry, index)
            if found is not None:
                counts[index] += found.waiting
    interactive, background = counts
    if lane == INTERACTIVE:
        # Background keeps its share: one grant in `share` while it waits.
        owed = 0 if not background or rules.share <= 0 else interactive // max(1, rules.share - 1)
        ahead = interactive + min(background, owed)
    else:
        ahead = interactive + background
    return Peek(max(0.0, free - now), ahead, max(0.0, state.pause - now))

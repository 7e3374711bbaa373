"""The schedule: the one rate-limit algorithm, as pure functions over one token's state.

Every limiter store (this process, every process of the host, every host through Redis) keeps
one ``TokenState`` per token and applies these functions to it atomically, with the store's own
clock as ``now``: the memory store under a lock, the host store in one SQLite transaction
(``BEGIN IMMEDIATE``), Redis with a compare-and-set. The waiting, queueing and sending around
it live in ``_ratelimit.Limiter``; this module neither waits nor does I/O.

The rules
---------

``N = requests``; ``W = period x (1 + margin)`` is the window; ``g = W / N`` is the even
spacing. Two tolerances absorb lateness: ``tol_w = period x margin / 2`` for the window and
``tol_g = period / N x margin / 2`` for the spacing. ``b`` is the burst: ``rate.burst`` for
interactive grants (``N`` when None), 1 for background grants and for a token whose server was
found to refuse bursts (``even``).

The state keeps ``records``, the dates of the last ``N`` starts (as recorded by rule 3), and
``due``, the theoretical arrival time of the even spacing (the GCRA's ``tat``).

1. **One grant at a time.** A grant is permission for one request to be written. At most one is
   outstanding per token: the next is made only once the holder reported its write (``sent``),
   gave the grant back unused (``release``), or its lease ran out.
2. **A grant is made only when due**: never before ``free``, the latest of
   - the window: the ``N``-th latest record ``+ W`` (any time, while fewer than ``N`` are
     recorded): fewer than ``N`` recorded starts then fall in the window;
   - the spacing, when ``b < N``: ``due - (b - 1) x g``;
   - for background grants with ``headroom = k``: the ``(N - k)``-th latest record ``+ W``
     (background work leaves ``k`` of the window's starts to interactive calls);
   - the pause (rule 5).
   No reservation is made ahead of time, so nothing made ahead can fail to move when a send is
   late.
3. **A start is dated no earlier than the real write, minus a tolerance.** Its time ``s`` is the
   store's clock when it is reported or, earlier and closer, the grant's time on the store's
   clock plus the time the holder measured on its own clock from asking for the grant to
   writing (the store granted after the holder asked, so ``s`` is still no earlier than the
   write). With ``d`` the ``free`` the grant was made for, the window records
   ``max(d, s - tol_w)`` (keeping the newest ``N``) and the spacing moves
   ``due = max(due, max(d, s - tol_g)) + g``: lateness up to a tolerance (a timer firing late,
   a round trip) never moves the schedule, and more moves it only by the excess, so small
   delays do not add up.
4. **A lease that runs out counts as a start at its end.** The holder renews its lease while it
   connects, and checks it on its own clock, synchronously, just before it writes: a holder whose
   loop stalled past its lease never writes, and one that crashed never renews. Either way the
   store assumes the worst, a write at the very end ``e`` of the lease: it records ``e`` and
   moves ``due = max(due, e) + g``.
5. **A pause** (a 429's ``Retry-After``) moves the earliest grant of every process. A 429 that
   comes right after starts closer than one spacing apart says that the server refuses bursts:
   the token is then spaced evenly (``even``) by every process.
6. **Order.** Each limiter reports, per lane, how many of its callers wait and when its oldest
   one arrived. A grant goes to the oldest waiter of the interactive lane, across every
   process, once it is free for interactive calls; to the background lane only when no
   interactive call waits, or when background work has waited through ``share - 1``
   interactive grants in a row (its minimum share; the token then waits until it is free for
   background work). Order decides only *who* gets a grant and may only delay *when*: it cannot
   affect the guarantees below. A report (or a limiter's registration) that still says the same
   and stands for at least half its grace more is kept as it is: asking again (a poll) changes
   nothing, so a store writes nothing. A store may also keep reports beside the state and write
   them without comparing (Redis does): a grant decided on a report one round trip old is
   still made only when due.
7. **Retries are recognised.** Asking again for a grant with the ticket that already holds it
   (an answer lost after the store committed) is answered "granted", to the same lane.

Why ``N + 1`` starts never fall within ``period x (1 + margin / 2)``
---------------------------------------------------------------------

By rule 1, real starts (writes to the socket) happen in the order of their grants, and each
start is recorded (reported, or its lease expired) before the next grant is made. Take any
``N + 1`` consecutive starts ``a_0 < ... < a_N``. When ``a_N``'s grant was made, at ``t``, the
newest ``N`` records were those of ``a_0 ... a_{N-1}``, each ``r_i >= a_i - tol_w`` (rule 3: the
reported time is no earlier than the write; rule 4: ``e > a_i``). Rule 2 allowed the grant, so
``t >=`` the ``N``-th latest record ``+ W = min(r_i) + W >= a_0 - tol_w + W``, and
``a_N >= t``: ``a_N - a_0 >= W - tol_w = period x (1 + margin / 2)``. More than ``period``, with
``margin / 2`` left for network jitter: a strict rolling window, and a fixed window (which
counts a subset of any rolling one), accept every start.

The spacing: each start moves ``due`` by at least ``g`` past ``max(due, r)``, with
``r >= a - tol_g``, so for consecutive starts ``a_i < a_j``, ``due`` before ``a_j``'s grant is at
least ``a_i - tol_g + (j - i) x g``, and rule 2 gives ``a_j >= due - (b - 1) x g``:
``a_j - a_i >= (j - i + 1 - b) x g - tol_g``. With ``b = 1``, consecutive starts are at least
``g - tol_g = period / N x (1 + margin / 2)`` apart: what a strict no-burst leaky bucket (nginx
``limit_req`` without ``burst``) accepts. With ``1 < b < N``, at most ``b`` starts fall within
any ``g - tol_g``.

This holds for any number of processes, loops and threads (they all go through the store), for
late sends (the start is the write, reported after it), cancellation (an unused grant is given
back; a lost one expires), crashes between grant and write (rule 4), pauses (rule 5) and lanes
(rule 6). Clock steps: the memory and host stores use the system's monotonic clock, which never
steps; the Redis store uses Redis's ``TIME``, and a forward step of that clock by more than a
tolerance is the one thing that can shorten a gap across processes (NTP slews, it does not step,
once synchronised).

A store that lost its state (Redis flushed or restarted, the host database deleted) forgets other
processes' starts; each process also keeps its own last ``N`` starts, its spacing and its pause
(``own``), and never starts sooner than they allow, so one process alone always keeps the limit.

Records are exact for ``N <= 64``. Above that, a record is rounded up to a multiple of
``W / 64`` and records of one such step are counted together, so a state keeps at most 65
records; a later record only delays grants, so the proof holds as is.
"""

from __future__ import annotations

import itertools
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
    "own_start",
    "pause",
    "peek",
    "refused",
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
#: Records kept exactly up to this many requests per window; above, counted per ``W / 64``.
EXACT_RECORDS = 64
#: How long a token found to refuse bursts stays evenly spaced after its last grant (rule 5):
#: its state is kept that long, so that the next process does not pay the 429s again.
EVEN_KEEP = 86_400.0


@attrs.frozen
class Rules:
    """What the schedule needs of a ``RateLimit``, computed once per limiter."""

    rate_limit: RateLimit
    interval: float  #: g: even spacing between starts, margin included
    tolerance: float  #: lateness absorbed by the spacing without moving it
    window: float  #: W: the rolling window, margin included
    window_tolerance: float  #: lateness absorbed by the window without moving it
    burst: int  #: starts allowed back to back (interactive); background always 1
    lease: float  #: how long a grant stays valid without a renewal
    user_ttl: float  #: how long a limiter counts as using the token after its last call
    share: int  #: background gets at least one grant in ``share`` while it waits (0: none)
    headroom: int  #: starts of the window background work leaves to interactive calls
    quantum: float  #: records are rounded up to a multiple of this (0: exact)

    @classmethod
    def of(cls, rate_limit: RateLimit, *, lease: float, share: int = 5, headroom: int = 0) -> Rules:
        requests = rate_limit.requests
        spacing = rate_limit.period / requests
        window = rate_limit.window
        return cls(
            rate_limit,
            interval=rate_limit.interval,
            tolerance=spacing * rate_limit.margin / 2,
            window=window,
            window_tolerance=rate_limit.period * rate_limit.margin / 2,
            burst=rate_limit.bursts,
            lease=lease,
            user_ttl=max(60.0, 2 * rate_limit.period + lease),
            share=share,
            headroom=min(max(headroom, 0), requests - 1),
            quantum=0.0 if requests <= EXACT_RECORDS else window / EXACT_RECORDS,
        )

    @property
    def min_gap(self) -> float:
        """The shortest gap between two evenly spaced starts this schedule allows."""
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

    due: float = _NEVER  #: the even spacing's theoretical next start (GCRA's tat)
    pause: float = _NEVER  #: the end of the last 429's Retry-After
    last: float = _NEVER  #: the last start
    #: the last ``requests`` starts as recorded (rule 3): [time, count], oldest first
    records: list[list[float]] = attrs.field(factory=list)
    clear: float = _NEVER  #: when the newest record leaves the window
    #: until when every start is evenly spaced (the server refused a burst; rule 5)
    even: float = _NEVER
    holder: str | None = None  #: the outstanding grant's ticket
    holder_lane: int = INTERACTIVE  #: the lane the outstanding grant was made to
    lease: float = _NEVER  #: when the outstanding grant runs out
    scheduled: float = _NEVER  #: the time the outstanding grant was due (``free``)
    granted: float = _NEVER  #: when the outstanding grant was made
    streak: int = 0  #: interactive grants in a row while background work waited
    #: limiter -> [requests, period, margin, burst, description, expiry]: who uses the token
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
            "records": self.records,
            "clear": _out(self.clear),
            "even": _out(self.even),
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
        if "records" not in data and data.get("due") is not None:
            # Written by a version that spaced every start: its due time was "no grant
            # before", which is what a pause is; kept as one.
            data = {**data, "pause": max(_in(data.get("pause")), _in(data["due"]))}
        return cls(
            due=_in(data.get("due")),
            pause=_in(data.get("pause")),
            last=_in(data.get("last")),
            records=[_record_in(entry) for entry in data.get("records") or ()],
            clear=_in(data.get("clear")),
            even=_in(data.get("even")),
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
        times = [
            self.due,
            self.pause,
            self.clear,
            self.even,
            self.lease if self.holder is not None else _NEVER,
        ]
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


def _record_in(value: Any) -> list[float]:
    when, count = value
    number = int(count)
    if number < 1:
        raise ValueError(f"not a record: {value!r}")
    time = _in(when)
    if time == _NEVER:
        raise ValueError(f"not a record: {value!r}")
    return [time, number]


def _user(value: Any) -> list[Any]:
    """A ``users`` entry as stored, checked: anything else is not a state of ours."""
    requests, period, margin, burst, where, expiry = value
    count, seconds, share, bursts = int(requests), _in(period), _in(margin), int(burst)
    if count < 1 or seconds <= 0 or not 0 <= share < 1 or not 1 <= bursts <= count:
        raise ValueError(f"not a rate: {value!r}")
    return [count, seconds, share, bursts, str(where), _in(expiry)]


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
    burst = int(entry[3])
    return RateLimit(
        int(entry[0]),
        float(entry[1]),
        margin=float(entry[2]),
        burst=None if burst == int(entry[0]) else burst,
    )


def _entry(rate: RateLimit, where: str, expiry: float) -> list[Any]:
    return [rate.requests, rate.period, rate.margin, rate.bursts, where, expiry]


def _lane(entry: list[Any], lane: int) -> Lane | None:
    value = entry[lane]
    if not value:
        return None
    return Lane(int(value[0]), float(value[1]), float(value[2]), float(value[3]))


# ---------------------------------------------------------------------- the window


def _nth_latest(records: list[list[float]], n: int) -> float:
    """The time of the ``n``-th latest recorded start, or never when fewer are recorded."""
    if n <= 0:
        return math.inf
    if len(records) == 1 or all(a[0] <= b[0] for a, b in itertools.pairwise(records)):
        ordered = records  # the usual case: recorded in time order
    else:
        ordered = sorted(records, key=lambda record: record[0])
    seen = 0
    for record in reversed(ordered):
        seen += int(record[1])
        if seen >= n:
            return float(record[0])
    return _NEVER


def _record(state: TokenState, time: float, rules: Rules) -> None:
    """Record a start at ``time`` (rule 3 or 4); keep the newest that hold ``requests``."""
    records = state.records
    quantum = rules.quantum
    if quantum:
        time = math.ceil(time / quantum) * quantum
        if records and records[-1][0] == time:
            records[-1][1] += 1
        else:
            records.append([time, 1])
    else:
        records.append([time, 1])
    total = 0
    for index in range(len(records) - 1, -1, -1):
        total += int(records[index][1])
        if total >= rules.rate_limit.requests:
            del records[:index]
            break
    state.clear = max(state.clear, time + rules.window)


def _start(state: TokenState, rules: Rules, start: float, due: float) -> None:
    """A start at ``start`` of a grant that was due at ``due`` (rules 3 and 4)."""
    _record(state, max(due, start - rules.window_tolerance), rules)
    state.due = max(state.due, max(due, start - rules.tolerance)) + rules.interval
    state.last = max(state.last, start)


def _free(state: TokenState, rules: Rules, lane: int) -> float:
    """The earliest a grant to ``lane`` may be made (rule 2)."""
    requests = rules.rate_limit.requests
    free = max(state.pause, _nth_latest(state.records, requests) + rules.window)
    burst = 1 if lane == BACKGROUND or state.even != _NEVER else rules.burst
    if burst < requests:
        free = max(free, state.due - (burst - 1) * rules.interval)
    if lane == BACKGROUND and rules.headroom:
        free = max(free, _nth_latest(state.records, requests - rules.headroom) + rules.window)
    return free


def own_start(state: TokenState, rules: Rules, start: float) -> None:
    """A process's own floor (``_ratelimit``'s ``own``): it wrote a request at ``start``."""
    _start(state, rules, start, _NEVER)


def own_free(state: TokenState, rules: Rules, lane: int) -> float:
    """When a process's own last starts and pause let it start again, on its own."""
    return _free(state, rules, lane)


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
    window = rate.window
    if state.suspect:
        # As if the whole window had just been used.
        state.records = [
            [
                math.ceil(now / rules.quantum) * rules.quantum if rules.quantum else now,
                rate.requests,
            ]
        ]
        state.clear = max(state.clear, now + window)
        state.due = max(state.due, now + window)
        state.suspect = False
    state.pause = min(state.pause, now + MAX_PAUSE)
    state.lease = min(state.lease, now + MAX_LEASE)
    state.last = min(state.last, now + MAX_LEASE)
    latest = now + MAX_LEASE
    if state.records:
        if len(state.records) > EXACT_RECORDS + 1:
            del state.records[: -(EXACT_RECORDS + 1)]
        for record in state.records:
            record[0] = min(float(record[0]), latest)
            record[1] = min(int(record[1]), rate.requests)
    state.clear = min(state.clear, latest + window)
    state.even = min(state.even, now + EVEN_KEEP)
    if state.even <= now:
        state.even = _NEVER
    state.due = min(state.due, max(now, state.pause) + MAX_LEASE + 2 * window)
    state.streak = min(max(state.streak, 0), 1 << 16)
    user_ttl = max(60.0, 2 * rate.period + MAX_LEASE)
    for entry in state.users.values():
        entry[-1] = min(float(entry[-1]), now + user_ttl)
    horizon = max(now, state.due, state.pause, state.clear) + MAX_LEASE + QUEUE_GRACE
    for entry in state.queued.values():
        entry[-1] = min(float(entry[-1]), horizon)


def _settle(state: TokenState, now: float, rules: Rules) -> None:
    """Expire a lost grant (rule 4) and the entries of limiters that went away."""
    _bound(state, now, rules)
    if state.holder is not None and now >= state.lease:
        _record(state, state.lease, rules)
        state.due = max(state.due, state.lease) + rules.interval
        state.last = max(state.last, state.lease)
        state.holder = None
    for table in (state.users, state.queued):
        for who in [who for who, entry in table.items() if float(entry[-1]) <= now]:
            del table[who]


def same_schedule(a: RateLimit, b: RateLimit) -> bool:
    """True when limiters at ``a`` and at ``b`` may share a token (``RateLimit.same_schedule``):
    with bursts, the same window; evenly spaced, the same rate (5/60s and 1/12s are one) and
    margin. Such limiters make grants alike, so each one's guarantee holds."""
    return a.same_schedule(b)


def _resize(state: TokenState, before: int, rules: Rules) -> None:
    """The token's rate changes from ``before`` requests per window to ``rules``': when the new
    window holds more starts than were kept, the unknown older ones are taken to be as late as
    the oldest kept one (they cannot have been later)."""
    requests = rules.rate_limit.requests
    kept = sum(int(record[1]) for record in state.records)
    if state.records and kept >= before and kept < requests:
        oldest = state.records[0]
        oldest[1] = int(oldest[1]) + requests - kept
        if rules.quantum:
            oldest[0] = math.ceil(float(oldest[0]) / rules.quantum) * rules.quantum
    state.clear = max(
        state.clear, max((r[0] for r in state.records), default=_NEVER) + rules.window
    )


def _check_rate(state: TokenState, now: float, rules: Rules, who: str, where: str) -> None:
    mine = rules.rate_limit
    changed: RateLimit | None = None
    for other, entry in state.users.items():
        theirs = _rate_of(entry)
        if not same_schedule(theirs, mine):
            if other != who:
                raise RateConflict(theirs, str(entry[4]))
            changed = theirs
    if changed is not None or (not state.users and state.due > now):
        # Nobody else uses the token: the new rate spaces the next start from the last one.
        state.due = min(state.due, state.last + rules.interval)
        if changed is not None:
            _resize(state, changed.requests, rules)
    entry = _entry(mine, where, now + rules.user_ttl)
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


def _first(state: TokenState, lane: int, who: str, mine: Lane | None) -> tuple[float, str] | None:
    """The oldest waiter of ``lane`` across every limiter, ``who``'s as it reports now."""
    heads = [
        (found.head, other)
        for other, entry in state.queued.items()
        if other != who and (found := _lane(entry, lane)) is not None and found.waiting > 0
    ]
    if mine is not None and mine.waiting > 0:
        heads.append((mine.head, who))
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
    even: bool = False,
) -> Grant:
    """Make the grant ``ticket`` to one of ``who``'s lanes, if due and its turn (rules 1, 2, 6).

    ``who`` is the asking limiter (one per process, event loop and limiter object), ``lanes``
    its queue (interactive, background) as it stands, the asker included. ``even``: this
    limiter learned that the token's server refuses bursts (rule 5).
    """
    _settle(state, now, rules)
    if state.holder == ticket:
        # Already ours: a retry of this grant whose write committed but whose answer was lost.
        return Grant(True, lane=state.holder_lane)
    _check_rate(state, now, rules, who, where)
    if even and state.even == _NEVER:
        state.even = now + EVEN_KEEP
    interactive = _first(state, INTERACTIVE, who, lanes[INTERACTIVE])
    background = _first(state, BACKGROUND, who, lanes[BACKGROUND])
    owed = background is not None and rules.share > 0 and state.streak >= rules.share - 1
    turn = BACKGROUND if interactive is None or owed else INTERACTIVE
    earliest = _free(state, rules, turn)
    _report(state, now, who, lanes, now + max(0.0, earliest - now) + QUEUE_GRACE)
    if state.holder is not None:
        return Grant(False, wait=max(earliest, state.lease) - now, held=True)
    if earliest > now:
        return Grant(False, wait=earliest - now)
    first = background if turn == BACKGROUND else interactive
    if first is None or first[1] != who:
        return Grant(False, wait=0.0, behind=first is not None)
    state.holder = ticket
    state.holder_lane = turn
    state.lease = now + rules.lease
    state.scheduled = earliest
    state.granted = now
    state.streak = 0 if turn == BACKGROUND else state.streak + (background is not None)
    if state.even != _NEVER:
        # Learned (rule 5): kept a day past the token's last grant, for every process.
        state.even = now + EVEN_KEEP
    left = list(lanes)
    served = left[turn]
    left[turn] = None if served is None else served.served()
    # The next head asks once this grant is reported (or its lease ran out).
    _report(state, now, who, (left[0], left[1]), now + rules.lease + rules.interval + QUEUE_GRACE)
    return Grant(True, lane=turn)


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
    _start(state, rules, start, state.scheduled)
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


def refused(state: TokenState, now: float, rules: Rules, *, seconds: float) -> tuple[float, bool]:
    """A 429: ``pause`` for ``seconds``, and (rule 5) when the token's recent starts went
    closer than one spacing, take it that the server refuses bursts and space the token
    evenly from now on. Returns the pause's length and whether this switched the token."""
    length = pause(state, now, rules, seconds=seconds)
    if state.even != _NEVER or rules.burst <= 1 or not _bursty(state, now, rules):
        return length, False
    state.even = now + EVEN_KEEP
    return length, True


def _bursty(state: TokenState, now: float, rules: Rules) -> bool:
    """Did recent starts go closer than an even spacing allows? (Records are dated up to a
    tolerance early, and with a quantum rounded up: both are allowed for.)"""
    recent = sorted(
        (float(when), int(count))
        for when, count in state.records
        if float(when) > now - rules.window - rules.lease
    )
    if not recent:
        return False
    slack = rules.min_gap - rules.window_tolerance - rules.quantum
    if rules.quantum:
        per_step = math.ceil(rules.quantum / rules.min_gap) + 1
        if any(count > per_step for _, count in recent):
            return True
    elif any(count > 1 for _, count in recent):
        return True
    return any(b - a < slack for (a, _), (b, _) in itertools.pairwise(recent))


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
    start is spaced from the last one at the new rate, and the window keeps the starts it
    knows. Returns where another one runs (then nothing changes: one rate per token)."""
    _settle(state, now, rules)
    for other, entry in state.users.items():
        if other != who:
            return str(entry[4])
    mine = rules.rate_limit
    before = state.users.get(who)
    state.users[who] = _entry(mine, where, now + rules.user_ttl)
    if state.last != _NEVER:
        state.due = state.last + rules.interval
    if before is not None:
        _resize(state, int(before[0]), rules)
    return None


@attrs.frozen
class Peek:
    """What a newcomer can know before queueing: for ``max_wait`` predictions."""

    free_in: float  #: seconds until the next grant could be made at the earliest
    ahead: int  #: calls elsewhere that will be served before a newcomer of the lane asked
    paused_for: float  #: seconds of a 429's pause left
    #: seconds until each of the next starts, were every one made as soon as allowed
    slots: tuple[float, ...] = ()
    cycle: float = 0.0  #: the window: ``per_cycle`` more starts take at least this long
    per_cycle: int = 1  #: ``requests``

    def wait(self, ahead: int) -> float:
        """Seconds until a newcomer with ``ahead`` calls before it could start, at the
        earliest (a prediction: never more than the schedule will make it wait)."""
        slots = self.slots
        if not slots:
            return self.free_in
        if ahead < len(slots):
            return slots[ahead]
        per = self.per_cycle
        if len(slots) >= 2 * per:  # the last `per` starts repeat one window later, and so on
            base = len(slots) - per
            rounds, rest = divmod(ahead - base, per)
            return slots[base + rest] + rounds * self.cycle
        return slots[-1] + (ahead - len(slots) + 1) * self.cycle / per


def peek(state: TokenState, now: float, rules: Rules, *, who: str, lane: int) -> Peek:
    """Read, for a newcomer to ``who``'s ``lane``; nothing that matters changes."""
    _settle(state, now, rules)
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
    slots = _simulate(state, now, rules, lane)
    return Peek(
        slots[0], ahead, max(0.0, state.pause - now), slots, rules.window, rules.rate_limit.requests
    )


def _simulate(state: TokenState, now: float, rules: Rules, lane: int) -> tuple[float, ...]:
    """Seconds from ``now`` to each of the next ``2 x requests`` starts (at most 130), were
    each made the moment it is allowed and written at once: the outstanding grant (if any)
    first, at ``now``. A copy of the state is used; nothing is changed."""
    trial = TokenState(
        due=state.due,
        pause=state.pause,
        records=[list(record) for record in state.records],
        even=state.even,
    )
    if state.holder is not None:
        _start(trial, rules, now, state.scheduled)
    count = 2 * min(rules.rate_limit.requests, EXACT_RECORDS + 1)
    slots: list[float] = []
    for _ in range(count):
        at = max(now, _free(trial, rules, lane))
        slots.append(at - now)
        _start(trial, rules, at, at)
    return tuple(slots)

"""What passes between the cache's front and its L2 backend.

`Backend` is the one protocol of the L2 tier: the verbs `CachedFunction`
uses, with the same signatures in every implementation (today Redis only:
`mcp_redis.cache.redis.RedisBackend`). `Envelope` is an L2 entry, `L1Entry`
an L1 one, `Fill` one write-back of a batch: named types instead of
f-strings and ``entry[3]``.
"""


from typing import Any, ClassVar, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Type

from ..validation import loads_bounded

__all__ = ["Backend", "Envelope", "L1Entry", "L1Stored", "Fill", "encode_envelope", "decode_envelope"]


class Envelope(NamedTuple):
    """An L2 entry: the value, how long it took to load, when it expires.

    Stored as the JSON object ``{"v": value, "d": load seconds, "x": expiry
    ms}`` (see `encode_envelope`).
    """

    value: Any
    delta: float  # load time in seconds (XFetch's delta)
    expiry: float  # logical expiry, unix seconds


class L1Entry(NamedTuple):
    """An L1 entry. A tuple, because the L1 hit path is ~1 µs."""

    value: Any
    expiry: float  # logical expiry (unix seconds), the L2 entry's
    bd: float  # delta * beta; 0 when XFetch cannot fire before `deadline`
    deadline: float  # when this L1 copy expires, on the monotonic clock


# What L1 holds: an `L1Entry`'s fields as a plain tuple, in the same order,
# always read by unpacking (``value, expiry, bd, deadline = stored``). CPython
# specialises unpacking an exact tuple, not a NamedTuple: ~50 ns on a ~0.9 µs
# L1 hit (measured), which the hit path cannot afford.
L1Stored = Tuple[Any, float, float, float]


class Fill(NamedTuple):
    """One epoch-guarded write-back of a batch (`Backend.fill_many`)."""

    value_key: str
    epoch_key: str
    epoch: str
    envelope: str
    px: int


def encode_envelope(value_json: str, delta: float, expiry: float) -> str:
    """The stored form of an `Envelope` whose value is already JSON text."""
    return f'{{"v":{value_json},"d":{delta:.6f},"x":{int(expiry * 1000)}}}'


def decode_envelope(raw: str) -> Envelope:
    """The `Envelope` stored as `raw`; raises ValueError/KeyError/TypeError when unreadable."""
    env = loads_bounded(raw, wrapped=1)  # {"v": value, ...}
    return Envelope(env["v"], float(env["d"]), float(env["x"]) / 1000.0)


class Backend(Protocol):
    """The L2 tier of the metadata cache: the verbs every implementation offers.

    Keys come from the front (`KeySpace`, one hash slot per entry: value and
    epoch key); values are stored envelopes (`encode_envelope`). Every verb
    may raise one of `errors` when the backend cannot be reached; the front
    then serves from L1 or the loader.
    """

    errors: ClassVar[Tuple[Type[BaseException], ...]]

    @property
    def available(self) -> bool:
        """False while the backend is known to be down (breaker open): skip L2."""

    def generation(self, key: str, px: int) -> str:
        """The namespace's generation ("0" when none), kept alive for `px` ms."""

    def get(self, key: str) -> Optional[str]:
        """One stored envelope, or None."""

    def get_all(self, keys: Sequence[str]) -> List[Optional[str]]:
        """Several values in one round trip (any keys; keys of one entry share a slot)."""

    def begin(self, value_key: str, epoch_key: str, marker_px: int) -> Tuple[Optional[str], str]:
        """Before a load: (the stored envelope or None, the epoch `fill` must find: the entry's, or a
        marker of this load left for `marker_px` ms when it has none)."""

    def begin_many(self, entries: Sequence[Tuple[str, str]], marker_px: int) -> List[str]:
        """`begin`'s epochs for many (value key, epoch key) pairs in one round trip."""

    def abandon(self, epoch_keys: Sequence[Tuple[str, str]]) -> None:
        """Delete the markers of loads that wrote nothing back: (epoch key, marker), where still in place."""

    def fill(self, value_key: str, epoch_key: str, epoch: str, envelope: str, px: int) -> None:
        """Store `envelope` for `px` ms unless the entry's epoch moved from `epoch`."""

    def fill_many(self, fills: Sequence[Fill]) -> None:
        """`fill` for many entries in one round trip."""

    def write(self, value_key: str, epoch_key: str, guard_px: int, channel: str,
              envelope: str, px: int, message: str) -> None:
        """Bump the epoch, delete (envelope "") or store the value, publish `message`."""

    def bump_generation(self, key: str, guard_px: int, channel: str, message_prefix: str) -> str:
        """Move the namespace to a new generation and publish it; returns it."""

    def claim(self, key: str, token: str, px: int) -> bool:
        """A short lock (``SET NX PX``): True when this caller got it (or holds it already: `token` is per claim)."""

    def release(self, key: str) -> None:
        """Drop a lock taken with `claim` (best effort: it expires anyway)."""

"""What every federated protocol shares: the payload, the query, the message keys and a Flower-free codec.

A protocol is its site step(s), its server step(s) and one driver ``run(query, ...)``. The driver only ever
calls ``query(action, payload) -> {site_id: reply}``; what carries the messages is the query's business:

* :class:`server.federation.FlowerQuery` sends Flower messages to SuperNodes (simulation or deployment);
* :class:`InMemoryQuery` calls each in-memory site's function in turn (tests, benchmarks, simulations),
  passing every payload through the same codec as the wire so that only wire-safe values travel.

An *action* names one round of one protocol. ``train.<name>`` and ``evaluate.<name>`` actions are sent as
Flower messages of that type (weights in, weights or metrics out); every other action ``a`` as ``query.a``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from common.errors import ProtocolError

Payload = dict[str, object]
"""A flat dict of named numpy arrays and scalars (int, float, str, bool, lists of those)."""

STUDY_KEY = "study-config-json"  # every message carries the study config it belongs to (as JSON)
SITE_ID_KEY = "site_id"  # every reply names the site that sent it
WEIGHT_PREFIX = "w/"  # model weights travel as arrays named ``w/<parameter>``
NUM_EXAMPLES_KEY = "num-examples"  # a training reply's case count
ARRAYS_KEY = "arrays"  # the message's ArrayRecord: every array of the payload
CONFIG_KEY = "config"  # the message's ConfigRecord: every scalar and list of the payload
PACKED_KEY = "packed"  # the ArrayRecord's one array: every array of the payload, back to back (pack_arrays)
MANIFEST_KEY = "packed-manifest"  # in the ConfigRecord: name, dtype, shape, offset and size of each
_PACKABLE = "biufcUS"  # numeric, boolean and fixed-width text arrays; never objects or records

ERROR_POLICY = 403  # the site's policy refuses the request
ERROR_DATA = 422  # the site's data (or the request) cannot be used as they are
ERROR_INTERNAL = 500  # the site step failed

_CATEGORIES = ("train", "evaluate")


class Query(Protocol):
    """``query(action, payload) -> {site_id: reply}``: one round of a protocol at every site of the cohort.

    ``failures`` holds, after each round, the sites (or nodes) whose answer was an error, with the reason; a
    query that tolerates none raises instead, and a protocol that sums over rounds must use such a query.
    """

    failures: dict[str, str]

    def __call__(self, action: str, payload: Mapping[str, object]) -> dict[str, Payload]:
        """Send ``payload`` for ``action`` to every site; valid replies by site id."""
        ...


def message_type(action: str) -> str:
    """The Flower message type of an action: ``train.x``/``evaluate.x`` as they are, ``query.<action>`` else."""
    category, _, name = action.partition(".")
    if category in _CATEGORIES and name:
        return action
    if "." in action:
        raise ValueError(f"action {action!r}: only train.<name> and evaluate.<name> may hold a dot")
    return f"query.{action}"


def pack_weights(weights: Mapping[str, np.ndarray]) -> Payload:
    """Model weights as payload entries ``w/<name>``."""
    return {f"{WEIGHT_PREFIX}{k}": np.asarray(v) for k, v in weights.items()}


def unpack_weights(payload: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The ``w/<name>`` entries of a payload as model weights."""
    return {k[len(WEIGHT_PREFIX):]: np.asarray(v) for k, v in payload.items() if k.startswith(WEIGHT_PREFIX)}


def to_wire(payload: Mapping[str, object]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Split a payload into its arrays and its scalars/lists, the two records of a message."""
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, object] = {}
    for key, value in payload.items():
        if not isinstance(key, str):
            raise ValueError(f"payload key {key!r} is not a string")
        if isinstance(value, np.ndarray):
            arrays[key] = np.ascontiguousarray(value)
        elif isinstance(value, np.generic):
            config[key] = value.item()
        elif isinstance(value, (list, tuple)):
            config[key] = [v.item() if isinstance(v, np.generic) else v for v in value]
        elif isinstance(value, (bool, int, float, str, bytes)):
            config[key] = value
        else:
            raise ValueError(f"payload entry {key!r} of type {type(value).__name__} cannot travel in a message")
    return arrays, config


def from_wire(arrays: Mapping[str, np.ndarray], config: Mapping[str, object]) -> Payload:
    """The payload that :func:`to_wire` split."""
    out: Payload = {k: np.asarray(v) for k, v in arrays.items()}
    out.update(config)
    return out


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Every array of a payload as one byte array and its JSON manifest.

    Flower moves each array of a message as objects of their own, each one HTTP request per hop on the
    deployment engine: a model of 48 tensors was ~100 requests a message. Packed, a message is a handful.
    """
    manifest, parts, offset = [], [], 0
    for name, value in arrays.items():
        array = np.ascontiguousarray(value)
        if array.dtype.kind not in _PACKABLE:
            raise ValueError(f"payload array {name!r} of dtype {array.dtype} cannot travel in a message")
        raw = array.tobytes()
        manifest.append([name, array.dtype.str, list(array.shape), offset, len(raw)])
        parts.append(raw)
        offset += len(raw)
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), json.dumps(manifest)


MAX_MANIFEST_CHARS = 1_000_000
MAX_ARRAY_BYTES = 1 << 30  # one array of a message at most (a message's packed arrays are one array)
_MAX_DIM = 2**40


def _manifest_entries(manifest: object) -> list:
    """The manifest's entries, each ``[name, dtype, shape, offset, size]`` with plain ints (no bools)."""
    if not isinstance(manifest, str) or len(manifest) > MAX_MANIFEST_CHARS:
        raise ValueError("the manifest is not a string of a sane length")
    entries = json.loads(manifest)
    if not isinstance(entries, list):
        raise ValueError("the manifest is not a list")

    def plain(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_DIM

    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list) and len(entry[2]) <= 32
                and all(plain(d) for d in entry[2]) and plain(entry[3]) and plain(entry[4])):
            raise ValueError("a manifest entry is malformed")
    return entries


def unpack_arrays(arrays: Mapping[str, np.ndarray], manifest: object) -> dict[str, np.ndarray]:
    """The arrays :func:`pack_arrays` packed; raises :class:`ProtocolError` unless the manifest describes the
    buffer exactly (known dtypes, sizes that add up, no overlap, unique names): the sender chose both."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError("(message)", f"packed arrays: {why}", "send arrays packed by fedbiopsy's codec")

    if set(arrays) != {PACKED_KEY}:
        raise bad("expected one packed array and its manifest")
    buffer = np.ascontiguousarray(arrays[PACKED_KEY])
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise bad("the packed array is not a flat byte array")
    try:
        entries = _manifest_entries(manifest)
    except (ValueError, RecursionError) as exc:  # json's errors are ValueErrors
        raise bad(str(exc)[:80]) from exc
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype_str, shape, start, size in entries:
        try:
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError) as exc:
            raise bad(f"unknown dtype for {name!r}") from exc
        if dtype.kind not in _PACKABLE or dtype.hasobject or dtype.itemsize == 0 or name in out:
            raise bad(f"entry {name!r}: dtype {dtype} not allowed, or a repeated name")
        count = math.prod(shape)
        if start != offset or size != count * dtype.itemsize or start + size > buffer.size:
            raise bad(f"entry {name!r} does not fit the buffer")
        out[name] = (np.frombuffer(buffer, dtype=dtype, count=count, offset=start).reshape(shape).copy() if count
                     else np.zeros(shape, dtype=dtype))
        offset += size
    if offset != buffer.size:
        raise bad("the buffer holds bytes no entry describes")
    return out


def check_npy(stype: str, data: bytes, max_bytes: int) -> None:
    """Raise :class:`ProtocolError` unless ``data`` is one ``.npy`` array (Flower's ``Array`` wire form) of a
    plain dtype whose header promises no more bytes than it holds: numpy allocates what a header says before
    it reads, and the header is the sender's."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError("(message)", f"array: {why}", "send arrays packed by fedbiopsy's codec")

    if stype != "numpy.ndarray" or len(data) > max_bytes:
        raise bad("not a numpy array of a sane size")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except (ValueError, TypeError, SyntaxError, OverflowError) as exc:
        raise bad("unreadable header") from exc
    if dtype.hasobject or dtype.kind not in _PACKABLE or math.prod(shape) * dtype.itemsize > len(data):
        raise bad("a dtype or shape its bytes do not hold")


def to_records(payload: Mapping[str, object]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """A payload as the contents of a message's two records: ``{PACKED_KEY: bytes}`` and the scalars/lists
    with the manifest of the packed arrays (:func:`pack_arrays`)."""
    arrays, config = to_wire(payload)
    packed, config[MANIFEST_KEY] = pack_arrays(arrays)
    return {PACKED_KEY: packed}, config


def wire_array(stype: str, data: bytes, load: Callable[[], np.ndarray]) -> np.ndarray:
    """One received array: ``load()`` (Flower's ``Array.numpy``) once :func:`check_npy` passed its bytes."""
    check_npy(stype, data, MAX_ARRAY_BYTES)
    return load()


def from_records(arrays: Mapping[str, np.ndarray], config: Mapping[str, object]) -> Payload:
    """The payload :func:`to_records` split (raises :class:`ProtocolError` on a packing that does not add up)."""
    scalars = dict(config)
    if MANIFEST_KEY in scalars or arrays:
        arrays = unpack_arrays(arrays, scalars.pop(MANIFEST_KEY, None))
    return from_wire(arrays, scalars)


def round_trip(payload: Mapping[str, object]) -> Payload:
    """``payload`` through the codec of a message (:func:`to_records`, :func:`from_records`), as the receiving
    side sees it: arrays packed and copied, tuples as lists."""
    arrays, config = to_records(payload)
    return from_records({k: v.copy() for k, v in arrays.items()},
                        {k: list(v) if isinstance(v, list) else v for k, v in config.items()})


Wire = Callable[[str, str, str, Payload], Payload]
"""``wire(direction, action, site, payload) -> payload`` sees (and may replace) every message of a
:class:`InMemoryQuery`; direction is ``"request"`` (server to site) or ``"reply"``."""

SiteFunction = Callable[[Any, Payload], Payload]
"""One round at one in-memory site: ``function(site_state, request) -> reply``."""


class InMemoryQuery:
    """A :class:`Query` over sites held in this process: ``steps[action](sites[site], payload)`` for each site.

    The cohort is fixed (every site answers every round, as the Flower cohort query requires), sites are
    asked in sorted order, and every request and reply goes through the message codec. ``actions`` lists the
    rounds in the order they were asked.
    """

    def __init__(self, sites: Mapping[str, Any], steps: Mapping[str, SiteFunction], *,
                 wire: Wire | None = None) -> None:
        if not sites:
            raise ProtocolError("(none)", "no site data given")
        self.sites = dict(sites)
        self.steps = dict(steps)
        self.wire = wire
        self.actions: list[str] = []
        self.failures: dict[str, str] = {}

    def __call__(self, action: str, payload: Mapping[str, object]) -> dict[str, Payload]:
        """Run ``action`` at every site; replies by site id."""
        if action not in self.steps:
            raise ProtocolError("(server)", f"no site step answers {action!r}",
                                f"use one of {sorted(self.steps)}")
        self.actions.append(action)
        replies: dict[str, Payload] = {}
        for site in sorted(self.sites):
            request = round_trip(payload)
            if self.wire is not None:
                request = self.wire("request", action, site, request)
            reply = round_trip(self.steps[action](self.sites[site], request))
            if self.wire is not None:
                reply = self.wire("reply", action, site, reply)
            replies[site] = reply
        return replies

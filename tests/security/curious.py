"""A curious server for the red-team suite: attacks written against one ``ask`` interface, run either through
Flower's simulation engine against the real ClientApp (:func:`run_attacks`) or straight into the site steps with
no policy check and no guard (:class:`UnguardedSites`, the site steps as they were before issue 14), and a generic
checker (:func:`leaks`) of everything a site answered.

``ask(action, payload, study)`` sends one message per action to every site, with ``study`` (chosen by the
attacker) as the message's study config, and returns the decoded replies by site id and the error replies by
``node-<id>`` as ``{"error": reason, "code": int}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import StudyConfig

log = logging.getLogger(__name__)

Ask = Callable[[str, Mapping[str, object], StudyConfig], dict[str, dict]]
Attack = Callable[[Ask], object]
NO_REPLY = -1  # the code of a node that did not answer the round
FAR = 50.0  # a standardised position beyond every patient


# ============================================================================================ plumbing


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and Python numbers (JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def replies_of(answer: Mapping[str, dict]) -> dict[str, dict]:
    """The valid replies of an answer, by site id."""
    return {k: v for k, v in answer.items() if not k.startswith("node-")}


def errors_of(answer: Mapping[str, dict]) -> dict[str, dict]:
    """The error replies of an answer, by ``node-<id>``."""
    return {k: v for k, v in answer.items() if k.startswith("node-")}


def study_of(**sections: object) -> StudyConfig:
    """An attacker's study config: the given sections over a short round timeout, any number of sites."""
    return StudyConfig.model_validate({"name": "curious-server", "round_timeout_s": 60.0, "min_sites": 1, **sections})


UNGUARDED_COMMIT = "da39eef0e6357d828478ec02885dd8aaa6746e32"  # main before issue 14: the steps had no guard
"""The deliberately unguarded site: the site steps and ClientApp error texts of this commit, run as they were."""

_WORKER = r"""
import io, json, pickle, struct, sys
out = sys.stdout.buffer
sys.stdout = sys.stderr  # the pipe carries only answers
from common import sitedata
for model in (sitedata.SitePolicy, sitedata.SiteConfig):  # site.yaml of today has keys the old site did not know
    model.model_config["extra"] = "ignore"
    model.model_rebuild(force=True)
from client.steps import SITE_STEPS
from common.config import StudyConfig
from common.errors import FedBiopsyError, PolicyError
from common.protocol import ERROR_DATA, ERROR_INTERNAL, ERROR_POLICY
from common.validation import load_site
dirs = json.loads(sys.argv[1])
def answer(action, payload, study_json):
    study = StudyConfig.model_validate(json.loads(study_json))
    got = {}
    for i, site_dir in enumerate(dirs):
        try:
            site = load_site(site_dir)
            got[site.site_id] = dict(SITE_STEPS[action].run(site, study, dict(payload)))
        except FedBiopsyError as err:
            got[f"node-{i}"] = {"error": str(err), "code": int(ERROR_POLICY if isinstance(err, PolicyError)
                                                                else ERROR_DATA)}
        except Exception as err:
            got[f"node-{i}"] = {"error": f"{type(err).__name__}: {err}", "code": int(ERROR_INTERNAL)}
    return got
while True:
    head = sys.stdin.buffer.read(8)
    if len(head) < 8:
        break
    request = pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", head)[0]))
    try:
        reply = {"answer": answer(*request)}
    except BaseException as err:
        reply = {"raised": f"{type(err).__name__}: {err}"}
    data = pickle.dumps(reply)
    out.write(struct.pack("<Q", len(data)) + data)
    out.flush()
"""


class UnguardedSites:
    """The sites behind the site steps of :data:`UNGUARDED_COMMIT` (no policy check, no guard, no release
    ledger; errors answered with their text), in one worker process; :meth:`ask` is an :data:`Ask`.

    The code of that commit is exported from the repository's git history into ``workdir``.
    """

    def __init__(self, site_dirs: Sequence[Path], workdir: Path, repo: Path | None = None) -> None:
        import subprocess
        import sys

        repo = Path(repo or Path(__file__).resolve().parents[2])
        code = Path(workdir) / "unguarded-code"
        code.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", UNGUARDED_COMMIT, "client", "common",
                                  "simulations"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": str(code)}
        dirs = json.dumps([str(Path(p).resolve()) for p in site_dirs])
        self._proc = subprocess.Popen([sys.executable, "-c", _WORKER, dirs], cwd=code, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, action: str, payload: Mapping[str, object], study: StudyConfig) -> dict[str, dict]:
        """One request to every site, answered by the unguarded steps."""
        import pickle
        import struct

        data = pickle.dumps((action, dict(payload), json.dumps(study.model_dump(mode="json", exclude_defaults=True))))
        stdin, stdout = self._proc.stdin, self._proc.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("the unguarded worker has no pipes")
        stdin.write(struct.pack("<Q", len(data)) + data)
        stdin.flush()
        head = stdout.read(8)
        if len(head) < 8:
            raise RuntimeError(f"the unguarded worker ended (exit code {self._proc.poll()}); see its stderr")
        reply = pickle.loads(stdout.read(struct.unpack("<Q", head)[0]))  # noqa: S301 - our own child process
        if "raised" in reply:
            raise RuntimeError(f"the unguarded worker failed: {reply['raised']}")
        return reply["answer"]

    def close(self) -> None:
        """Stop the worker."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self._proc.kill()
            self._proc.wait()


class _RecordingGrid:
    """A Grid that remembers the error code of every reply (the Federation keeps only the reason)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.codes: dict[int, int] = {}
        self._dst_of: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        messages = list(messages)
        self._dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        self.codes = {}
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_error():
                node = self._dst_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.codes[int(node)] = int(reply.error.code)
        return replies


def run_attacks(site_dirs: Sequence[Path], attacks: Mapping[str, Attack], tmp: Path) -> dict[str, object]:
    """Run every attack, in order, in ONE simulation of Flower against the real ClientApp over ``site_dirs``.

    The ServerApp (a thread of this process) builds a :class:`server.federation.Federation`, waits for every
    node and runs each attack with an ``ask`` over :meth:`Federation.send`. Returns each attack's (JSON-able)
    result; an attack that raises is recorded as ``{"raised": "<type>: <message>"}``. The results are also
    written to ``tmp/attacks.json``.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.federation import Federation
    from simulations.engine import site_path_mod
    from simulations.vce_polling import indexed_message_polling

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        recording = _RecordingGrid(grid)
        federation = Federation(recording, study_of())  # type: ignore[arg-type]
        nodes = federation.wait(len(site_dirs), timeout_s=180.0)

        def ask(action: str, payload: Mapping[str, object], study: StudyConfig) -> dict[str, dict]:
            federation.study = study  # the study JSON of every message comes from the Federation's study
            result = federation.send(action, payload, nodes, minimum=0)
            answer: dict[str, dict] = {site: dict(reply) for site, reply in result.replies.items()}
            for node, reason in result.errors.items():
                answer[f"node-{node}"] = {"error": reason, "code": recording.codes.get(node, NO_REPLY)}
            for node in result.dropped:
                answer[f"node-{node}"] = {"error": "no reply within the round timeout", "code": NO_REPLY}
            return answer

        for name, attack in attacks.items():
            try:
                results[name] = jsonable(attack(ask))
            except Exception as err:  # noqa: BLE001 - one broken attack must not hide the others
                log.exception("attack %s raised", name)
                results[name] = {"raised": f"{type(err).__name__}: {err}"}

    backend_config = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                      "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    with warnings.catch_warnings(), indexed_message_polling():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=build_client_app(mods=[site_path_mod(site_dirs)]),
                       num_supernodes=len(site_dirs), backend_config=backend_config)  # type: ignore[arg-type]
    missing = [name for name in attacks if name not in results]
    if missing:
        raise RuntimeError(f"the simulation ended before attack(s) {missing} ran; see the Flower log above")
    (tmp / "attacks.json").write_text(json.dumps(results, indent=1, default=str))
    return results


# ============================================================================================ what a site holds


@dataclass(frozen=True)
class SiteTruth:
    """What must never leave one site: its ids, survival, ages, feature rows and where it lives."""

    root: Path
    site_id: str
    clinical: pd.DataFrame  # indexed by patient_id
    features: pd.DataFrame  # the :data:`FEATURE_TABLES` side by side, indexed by patient_id (may be empty)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted({str(self.root), str(self.root.resolve())}))


FEATURE_TABLES = ("features.csv", "features_harmonised.csv", "signature_scores.csv")  # derived/, once written


def site_truth(site_dir: Path) -> SiteTruth:
    """The patient-level data of one site directory (for the checks; the attacks never read it). The feature
    tables of ``derived/`` that do not exist yet (early in a study) count as empty."""
    from common.sitedata import load_site_config

    root = Path(site_dir)
    clinical = pd.read_csv(root / "clinical.csv", dtype={"patient_id": str}).set_index("patient_id")
    tables = [pd.read_csv(root / "derived" / name, dtype={"patient_id": str}).set_index("patient_id")
              for name in FEATURE_TABLES if (root / "derived" / name).is_file()]
    features = pd.concat(tables, axis=1) if tables else pd.DataFrame(index=pd.Index([], name="patient_id"))
    return SiteTruth(root, load_site_config(root).site_id, clinical, features)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_EXCEPTION = re.compile(r"\b(Traceback|[A-Z][A-Za-z]*(?:Error|Exception|Warning)):")
_CLINICAL_VALUES = ("os_days", "age")
_CLINICAL_ATOL = 1e-5  # a clinical value as a Python number: within 1e-5 (a survival time rebuilt from bins)
_CELL_RTOL = 1e-9  # a features.csv cell, and any float64 array element: within 1e-9 relative


def _walk(value: Any, where: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield f"{where}/{k}", str(k)
            yield from _walk(v, f"{where}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}[{i}]")
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            yield where, value  # scanned at once (model weights hold millions of numbers)
        elif value.dtype.kind in "biu":
            return  # integers: counts, sizes, labels; no patient value of the checks is a whole number
        else:
            yield from _walk(value.tolist(), where)
    elif isinstance(value, np.generic):
        yield where, value.item()
    else:
        yield where, value


def _near(values: np.ndarray, x: float, atol: float, rtol: float) -> bool:
    if values.size == 0 or not math.isfinite(x):
        return False
    i = int(np.searchsorted(values, x))
    return any(abs(values[j] - x) <= atol + rtol * abs(values[j]) for j in (i - 1, i) if 0 <= j < values.size)


def _matches(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The elements of a float64 array ``x`` within :data:`_CELL_RTOL` of one of the sorted ``values``."""
    x = x[np.isfinite(x)].astype(np.float64)
    if values.size == 0 or x.size == 0:
        return x[:0]
    i = np.clip(np.searchsorted(values, x), 1, max(values.size - 1, 1))
    lo, hi = values[i - 1], values[np.minimum(i, values.size - 1)]
    hit = (np.abs(lo - x) <= _CELL_RTOL * np.abs(lo)) | (np.abs(hi - x) <= _CELL_RTOL * np.abs(hi))
    return x[hit]


SMALL_DENOMINATORS = np.arange(1, 65)  # counts of a site's cohort: their ratios are what count aggregates are


def _distinctive(values: Iterable[object]) -> np.ndarray:
    """The sorted distinct values that an honest aggregate does not hit by chance: finite, not a multiple of 0.1
    (whole numbers are counts and sizes; halves and tenths are sums of halves, bin edges, fractions) and not a
    ratio of small whole numbers (a group indicator's mean n1/n and centred sum of squares n1 n0/n are; a
    feature that is itself a ratio of voxel counts can equal one: 24/7, seen on one machine's Cox moments)."""
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    tenths = arr * 10.0
    arr = arr[np.abs(tenths - np.round(tenths)) > 1e-9 * np.maximum(1.0, np.abs(tenths))]
    scaled = arr[:, None] * SMALL_DENOMINATORS[None, :]
    ratio = np.any(np.abs(scaled - np.round(scaled)) <= 1e-9 * np.maximum(1.0, np.abs(scaled)), axis=1)
    return np.unique(arr[~ratio])


class LeakIndex:
    """The patient-level values of some site directories, compiled once, and :meth:`scan` of an answer."""

    def __init__(self, site_dirs: Sequence[Path]) -> None:
        truths = [site_truth(Path(d)) for d in site_dirs]
        ids = sorted({str(i) for t in truths for i in t.clinical.index}, key=len, reverse=True)
        self._ids = [(i, re.compile(rf"(?<![A-Za-z0-9_]){re.escape(i)}(?![A-Za-z0-9_])")) for i in ids]
        self._paths = sorted({p for t in truths for p in t.paths}, key=len, reverse=True)
        self._clinical = {col: _distinctive(v for t in truths if col in t.clinical for v in t.clinical[col])
                          for col in _CLINICAL_VALUES}
        self._cells = _distinctive(v for t in truths for v in t.features.to_numpy().ravel())

    def _number(self, x: float) -> str | None:
        for col, values in self._clinical.items():
            if _near(values, x, _CLINICAL_ATOL, 0.0):
                return col
        return "derived feature or score cell" if _near(self._cells, x, 0.0, _CELL_RTOL) else None

    def _array(self, where: str, x: np.ndarray) -> list[str]:
        if x.dtype.itemsize < 8 or x.dtype.kind == "c":
            # float32 (model weights, images) cannot hold a float64 patient value; equality with one rounded to
            # float32 happens by chance among a network's ~1e5 weights, so such arrays are not value-matched
            return []
        x = np.ravel(x)
        found = []
        for what, values in (*self._clinical.items(), ("derived feature or score cell", self._cells)):
            hits = _matches(values, x)
            if hits.size:
                found.append(f"{where}: {hits.size} element(s) equal to a patient's {what}, e.g. {hits[0]!r}")
        return found

    def scan(self, answer: object) -> list[str]:
        """Every finding in ``answer`` (see :func:`leaks`), one line each."""
        found: list[str] = []
        for where, value in _walk(answer):
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, np.ndarray):
                found += self._array(where, value)
                continue
            if isinstance(value, (int, float)):
                what = self._number(float(value))
                if what:
                    found.append(f"{where}: {value!r} is a patient's {what}")
                continue
            text = str(value)
            found += [f"{where}: patient id {i!r}" for i, pattern in self._ids if pattern.search(text)]
            found += [f"{where}: site path {p!r}" for p in self._paths if p in text]
            if _EXCEPTION.search(text):
                found.append(f"{where}: exception text {_EXCEPTION.search(text).group(0)!r}")  # type: ignore[union-attr]
            for token in _NUMBER.findall(text):
                what = self._number(float(token))
                if what:
                    found.append(f"{where}: {token} in {text[:80]!r} is a patient's {what}")
        return found


def leaks(answer: object, site_dirs: Sequence[Path]) -> list[str]:
    """Every string and number of ``answer`` that identifies a patient of ``site_dirs``: patient ids (as whole
    tokens), paths of a site directory, exception text, or an exact value of clinical.csv ``os_days``/``age``
    or of a cell of a table of :data:`FEATURE_TABLES` (as a number, in a float64 array, or written in a
    string). Only values that are not multiples of 0.1 are matched (counts, sizes, halves and tenths are what
    honest aggregates hold); a number matches a clinical value within 1e-5 (float64 arrays: 1e-9 relative),
    a cell within 1e-9 relative; integer and float32 arrays (labels, model weights) are not value-matched.
    One line per finding."""
    return LeakIndex(site_dirs).scan(answer)


# ============================================================================================ reply recorder


def _field_kind(value: object) -> dict[str, object]:
    """What one reply field is, for the inventory: an array's dtype and shape, or a config value's type."""
    if isinstance(value, np.ndarray):
        return {"kind": "array", "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "items": sorted({type(v).__name__ for v in value}), "len": len(value)}
    return {"kind": type(value).__name__}


def _append_line(path: Path, record: Mapping[str, object]) -> None:
    import fcntl

    line = json.dumps(jsonable(record), sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        try:
            out.write(line)
            out.flush()
        finally:
            fcntl.flock(out, fcntl.LOCK_UN)


class _IndexCache:
    """One :class:`LeakIndex` per site directory, rebuilt when a file it reads changes (the study writes the
    feature tables as it goes)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[tuple, LeakIndex]] = {}

    def get(self, site_dir: Path) -> LeakIndex:
        files = [site_dir / "clinical.csv", *(site_dir / "derived" / n for n in FEATURE_TABLES)]
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)
        held = self._held.get(str(site_dir))
        if held is None or held[0] != stamp:
            held = (stamp, LeakIndex([site_dir]))
            self._held[str(site_dir)] = held
        return held[1]


def reply_recorder(out_dir: Path) -> Callable:
    """A ClientApp mod that records every reply of its node to ``out_dir/replies-<node id>.jsonl``, after the
    handler (and the mods after it) ran: the message type, whether it is an error (and its code), every
    field with its kind/shape and the :func:`leaks` findings of the reply's content (arrays and config values,
    or the error's reason) against the node's site (``data-path``: put the mod after
    :func:`simulations.engine.site_path_mod`). Never changes the reply; a failure of its own is recorded."""
    out = str(Path(out_dir).resolve())
    cache = _IndexCache()

    def mod(msg: Any, context: Any, call_next: Callable) -> Any:
        from client.app import DATA_PATH_KEY, decode

        reply = call_next(msg, context)
        record: dict[str, object] = {"type": msg.metadata.message_type, "node": int(context.node_id)}
        try:
            site = context.node_config.get(DATA_PATH_KEY)
            if not site:
                raise RuntimeError(f"no {DATA_PATH_KEY!r}: the recorder ran before site_path_mod")
            index = cache.get(Path(str(site)))
            if reply.has_error():
                record |= {"error": True, "code": int(reply.error.code), "fields": {},
                           "leaks": index.scan({"reason": str(reply.error.reason)})}
            else:
                content = decode(reply.content)
                record |= {"error": False, "fields": {k: _field_kind(v) for k, v in content.items()},
                           "leaks": index.scan(content)}
        except Exception as err:  # noqa: BLE001 - the study must go on; the test reads the failure
            record |= {"recorder_failed": f"{type(err).__name__}: {err}"}
        Path(out).mkdir(parents=True, exist_ok=True)
        _append_line(Path(out) / f"replies-{record['node']}.jsonl", record)
        return reply

    return mod


def read_replies(out_dir: Path) -> list[dict]:
    """Every record :func:`reply_recorder` wrote under ``out_dir``."""
    return [json.loads(line) for f in sorted(Path(out_dir).glob("replies-*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


# ============================================================================================ attacks


@dataclass
class _Scaling:
    mean: np.ndarray
    scale: np.ndarray
    names: list[str]


def _pooled_scaling(answer: Mapping[str, dict]) -> _Scaling | None:
    """Pooled mean and sd from the sites' ``kmeans_moments`` replies, as the honest server computes them."""
    parts: list[tuple[float, np.ndarray, np.ndarray]] = []
    names: list[str] = []
    for reply in replies_of(answer).values():
        try:
            n, mean, m2 = float(reply["n"]), np.atleast_1d(np.asarray(reply["mean"], float)), np.asarray(reply["m2"],
                                                                                                       float)
        except (KeyError, TypeError, ValueError):
            continue
        if parts and mean.shape != parts[0][1].shape:
            continue
        parts.append((n, mean, np.atleast_1d(m2)))
        names = [str(x) for x in reply.get("features", names)]  # type: ignore[union-attr]
    if not parts:
        return None
    total = sum(p[0] for p in parts)
    mean = np.sum([p[0] * p[1] for p in parts], axis=0) / total
    within = np.sum([p[2] for p in parts], axis=0)
    var = (within + np.sum([p[0] * np.square(p[1] - mean) for p in parts], axis=0)) / total
    scale = np.sqrt(np.asarray(var, float))
    scale[~(scale > 0)] = 1.0
    return _Scaling(np.asarray(mean, float), scale, names or [f"feature_{j}" for j in range(mean.size)])


def _split_centres(d: int, tau: float, feature: int = 0) -> np.ndarray:
    """Two centres equal but in ``feature``: a patient goes to the first iff its standardised value <= ``tau``."""
    centres = np.zeros((2, d))
    centres[0, feature], centres[1, feature] = tau - 1.0, tau + 1.0
    return centres


def _first_error(answer: Mapping[str, dict]) -> str | None:
    errs = errors_of(answer)
    return next((str(e.get("error")) for e in errs.values()), None)


_Point = tuple[float, "np.ndarray | None", "np.ndarray | None"]  # patients below the split, their sum or the rest's


def _below_split(reply: Mapping[str, object], d: int) -> _Point | None:
    """From one ``kmeans_assign`` reply to a two-centre split: the count below the split and either its sum or
    (when that cell is suppressed) the sum of the released complement; None when the reply tells neither."""
    try:
        counts = np.asarray(reply["counts"], float)
        sums = np.asarray(reply["sums"], float)
        n = float(reply["n"])  # type: ignore[arg-type]
        suppressed = int(reply.get("suppressed", 0))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        return None
    if reply.get("held"):  # the site repeated an earlier answer: nothing new
        return None
    if counts.shape != (2,) or sums.shape != (2, d) or np.any(counts != np.round(counts)):
        return None
    if suppressed == 0 or counts[0] > 0:  # below released (or empty)
        return float(counts[0]), sums[0], None
    if suppressed == 1 and counts[1] > 0:  # below suppressed: n minus the released complement
        return n - float(counts[1]), None, sums[1]
    return None


def _splits_to_refine(below: Mapping[str, Mapping[float, _Point]]) -> list[float]:
    """Midpoints of the adjacent splits between which two or more patients of a site crossed."""
    todo = set()
    for points in below.values():
        taus = sorted(points)
        for lo, hi in zip(taus, taus[1:], strict=False):
            if points[hi][0] - points[lo][0] >= 2 and hi - lo > 1e-9:
                todo.add((lo + hi) / 2)
    return sorted(todo)


def _rows_from_splits(points: Mapping[float, _Point], scaling: _Scaling) -> list[list[float]]:
    """The feature rows (raw units) of the patients who crossed between two adjacent splits alone."""
    total = points.get(FAR)
    if total is None or total[1] is None:
        return []
    sums = {tau: (k, s if s is not None else total[1] - rest) for tau, (k, s, rest) in points.items()}
    taus = sorted(sums)
    return [((sums[hi][1] - sums[lo][1]) * scaling.scale + scaling.mean).tolist()
            for lo, hi in zip(taus, taus[1:], strict=False) if sums[hi][0] - sums[lo][0] == 1]


def attack_kmeans_differencing(ask: Ask, max_rounds: int = 80) -> dict:
    """Sweep a two-centre split along one standardised feature and difference the released cluster sums
    (a suppressed cell is the total minus its complement): each patient crossing the split alone is one
    exact feature row. Returns the recovered rows per site (raw units, in the moments' feature order)."""
    study = study_of(phases=["outcomes"], outcomes={"k": 2})
    moments = ask("kmeans_moments", {}, study)
    scaling = _pooled_scaling(moments)
    if scaling is None:
        return {"rounds": 1, "recovered": {}, "error": _first_error(moments)}
    d = scaling.mean.size
    below: dict[str, dict[float, _Point]] = {}
    rounds = 1
    errors = [e for e in [_first_error(moments)] if e]

    def probe(tau: float) -> bool:
        nonlocal rounds
        answer = ask("kmeans_assign", {"mean": scaling.mean, "scale": scaling.scale,
                                       "centres": _split_centres(d, tau)}, study)
        rounds += 1
        errors.extend(e for e in [_first_error(answer)] if e)
        useful = False
        for site, reply in replies_of(answer).items():
            point = _below_split(reply, d)
            if point is not None:
                below.setdefault(site, {})[tau] = point
                useful = True
        return useful

    for tau in (FAR, -FAR, *np.linspace(-2.5, 2.5, 9)):
        probe(float(tau))
        if rounds >= 4 and not below:
            break  # nothing is answered: the site refuses the sweep
    while rounds < max_rounds:
        todo = _splits_to_refine(below)[: max_rounds - rounds]
        if not todo or not any([probe(t) for t in todo]):
            break
    recovered = {site: _rows_from_splits(points, scaling) for site, points in below.items()}
    return {"rounds": rounds, "features": scaling.names, "recovered": recovered,
            "error": errors[0] if errors else None}


def _labels_round(ask: Ask, study: StudyConfig, scaling: _Scaling, tau: float) -> dict[str, dict]:
    return ask("kmeans_labels", {"mean": scaling.mean, "scale": scaling.scale,
                                 "centres": _split_centres(scaling.mean.size, tau)}, study)


def _group(reply: Mapping[str, object], label: int) -> tuple[int, int] | None:
    """(patients, events) of one group of a survival-table reply; None when the group is not in it."""
    try:
        labels = [int(x) for x in reply["group_labels"]]  # type: ignore[attr-defined]
        removed = np.atleast_2d(np.asarray(reply["removed"], float))
        observed = np.atleast_2d(np.asarray(reply["observed"], float))
    except (KeyError, TypeError, ValueError):
        return None
    if label not in labels:
        return None
    j = labels.index(label)
    n, e = removed[j].sum(), observed[j].sum()
    return (int(n), int(e)) if n == round(n) and e == round(e) else None


def attack_survival_bin_width(ask: Ask) -> dict:
    """Every patient in one group (the other centre far away), then a binned survival table with a bin of
    1e-6 days, asked in the message and in the study: the released times are patients' exact days."""
    width = 1e-6
    study = study_of(phases=["outcomes"], outcomes={"k": 2, "time_bin_days": width})
    scaling = _pooled_scaling(ask("kmeans_moments", {}, study))
    if scaling is None:
        scaling = _Scaling(np.zeros(1), np.ones(1), [])
    labels = _labels_round(ask, study, scaling, FAR)
    table = ask("survival_table", {"mode": "binned", "time_bin_days": width}, study)
    times = {}
    for site, reply in replies_of(table).items():
        try:
            times[site] = [float(t) for t in np.asarray(reply["times"], float).ravel()]
        except (KeyError, TypeError, ValueError):
            continue
    return {"times": times, "error": _first_error(table) or _first_error(labels)}


def attack_group_relabelling(ask: Ask, max_probes: int = 12) -> dict:
    """Two labellings that differ by one patient (the site's highest value of one feature moves from group 0
    to group 1), each followed by an honestly binned survival table: the difference of group 0's event counts
    is that patient's event flag. Returns per site the flag, the patients moved and the split used."""
    study = study_of(phases=["outcomes"], outcomes={"k": 2, "time_bin_days": 7.0})
    moments = ask("kmeans_moments", {}, study)
    scaling = _pooled_scaling(moments)
    if scaling is None:
        return {"sites": {}, "error": _first_error(moments)}

    errors: list[str] = []

    def tables(tau: float) -> dict[str, tuple[int, int] | None]:
        labels = _labels_round(ask, study, scaling, tau)
        answer = ask("survival_table", {"mode": "binned", "time_bin_days": 7.0}, study)
        errors.extend(e for e in (_first_error(labels), _first_error(answer)) if e)
        return {site: _group(reply, 0) for site, reply in replies_of(answer).items()} | {
            k: None for k in errors_of(answer)}

    everyone = tables(FAR)  # group 0 = every patient
    sites = {s: g for s, g in everyone.items() if g is not None}
    bounds = {s: [-1.0, 4.0] for s in sites}
    found: dict[str, dict] = {}
    for _ in range(max_probes):
        pending = [s for s in bounds if s not in found]
        if not pending:
            break
        tau = float(np.mean(bounds[pending[0]]))
        got = tables(tau)
        for site in pending:
            g = got.get(site)
            lo, hi = bounds[site]
            if not lo <= tau <= hi:
                continue
            if g is not None and g[0] == sites[site][0] - 1:
                found[site] = {"flag": sites[site][1] - g[1], "moved": sites[site][0] - g[0], "tau": tau}
            elif g is not None and g[0] == sites[site][0]:
                bounds[site][1] = tau
            else:
                bounds[site][0] = tau
    return {"sites": found, "features": scaling.names, "mean": scaling.mean, "scale": scaling.scale,
            "error": errors[0] if errors else _first_error(moments)}


def attack_refusal_texts(ask: Ask) -> dict:
    """Requests a site refuses or fails on, chosen so that the old refusal texts quote patient values: ComBat
    with ``os_days`` as a categorical covariate, a classifier evaluation stratified by ``age``, and a k-means
    request whose scaling does not fit the features (a raw exception). Returns every answer as it came."""
    from common.classifier.models import build_model, model_weights
    from common.harmonisation import options_from_config
    from common.protocol import pack_weights

    out: dict[str, object] = {}
    combat = study_of(phases=["harmonisation"], harmonisation={"categorical": ["os_days"]})
    options = options_from_config(combat.harmonisation)
    out["combat_summary"] = ask("combat_summary", {"options": json.dumps(options.to_dict(), sort_keys=True)}, combat)

    clf = study_of(phases=["classifier"], classifier={"fairness_attributes": ["age"], "holdout_fraction": 0.5,
                                                      "bootstrap": 0, "shap": False})
    moments = ask("classifier_moments", {"model": "logistic"}, clf)
    out["classifier_moments"] = moments
    replies = replies_of(moments)
    names = next((list(r["feature_names"]) for r in replies.values() if "feature_names" in r), [])  # type: ignore[call-overload]
    if names:
        scaling = _pooled_scaling(moments) or _Scaling(np.zeros(len(names)), np.ones(len(names)), names)
        weights = model_weights(build_model("logistic", len(names), clf.classifier))
        payload = {"model": "logistic", "feature_names": names, "x_mean": scaling.mean, "x_scale": scaling.scale,
                   "nyul_json": "", "lr": 0.5, **pack_weights(weights)}
        out["evaluate.classifier"] = ask("evaluate.classifier", payload, clf)

    kmeans = study_of(phases=["outcomes"], outcomes={"k": 2})
    out["kmeans_assign_malformed"] = ask("kmeans_assign", {"mean": np.zeros(3), "scale": np.ones(3),
                                                           "centres": np.zeros((2, 3))}, kmeans)
    return out


def file_read_attack(site_dirs: Sequence[Path]) -> Attack:
    """The attack that names each site's ``clinical.csv`` (an absolute path) as the radiomics settings file."""
    targets = [str((Path(p) / "clinical.csv").resolve()) for p in site_dirs]

    def attack_file_read(ask: Ask) -> dict:
        return {f"target-{i}": ask("features", {}, study_of(phases=["features"], features={"settings": target}))
                for i, target in enumerate(targets)}

    return attack_file_read


# ============================================================================================ statistics and budget


CLASSIFIER = {"models": ["logistic"], "features": "table", "holdout_fraction": 0.5, "fairness_attributes": [],
              "bootstrap": 0, "shap": False, "rounds": 1, "auto_lr": False, "lr": 0.1}
"""The attacker's classifier section: one logistic round on the radiomics table, the split of
:func:`attack_refusal_texts` (holdout 0.5, seed 0), so that the site's release ledger sees the same split."""
DP_SIGMA, DP_BATCH, DP_STEPS = 1.0, 2, 3  # the private rounds of :func:`attack_dp_bounds`
BATCH_ONE_SIGMA = 5.0  # a private step over one patient, with plenty of noise (cheap in epsilon)


def classifier_study(name: str = "curious-server", **classifier: object) -> StudyConfig:
    """An attacker's classifier study: :data:`CLASSIFIER` updated with ``classifier``."""
    return StudyConfig.model_validate({"name": name, "round_timeout_s": 60.0, "min_sites": 1,
                                       "phases": ["classifier"], "classifier": {**CLASSIFIER, **classifier}})


def dp_study(name: str, **dp: object) -> StudyConfig:
    """A private classifier study of :data:`DP_STEPS` local steps (``dp`` over sigma, batch of the module)."""
    return classifier_study(name, local_steps=DP_STEPS,
                            dp={"enabled": True, "noise_multiplier": DP_SIGMA, "batch_size": DP_BATCH, **dp})


def _classifier_payload(answer: Mapping[str, dict]) -> tuple[dict[str, object], _Scaling] | None:
    """The entries of a feature model's message from a ``classifier_moments`` answer (names, pooled scaling,
    a fresh logistic model's weights), and the scaling; None when no site sent its moments."""
    from common.classifier.models import build_feature_model, model_weights
    from common.protocol import pack_weights

    names = next((list(r["feature_names"]) for r in replies_of(answer).values() if "feature_names" in r), None)
    scaling = _pooled_scaling(answer)
    if not names or scaling is None:
        return None
    scaling = _Scaling(scaling.mean, scaling.scale, [str(n) for n in names])
    weights = model_weights(build_feature_model("logistic", len(names)))
    return ({"model": "logistic", "feature_names": scaling.names, "x_mean": scaling.mean, "x_scale": scaling.scale,
             "nyul_json": "", "lr": 0.1, **pack_weights(weights)}, scaling)


def _logistic_reading(d: int, feature: int, a: float, b: float) -> dict[str, np.ndarray]:
    """Logistic weights whose score is sigmoid(a * z[feature] + b): the model reads one standardised feature."""
    from common.classifier.models import build_feature_model, model_weights

    w = model_weights(build_feature_model("logistic", d))
    weight = np.zeros((1, d), dtype=np.float64)
    weight[0, feature] = a
    return {**w, "0.weight": weight, "0.bias": np.array([b], dtype=np.float64)}


def attack_score_bins(ask: Ask, a: float = 1.0, b: float = 0.0, bins: int = 64) -> dict:
    """A logistic model that reads feature 0 alone, evaluated with the most score bins the site allows: each bin
    holding one held-out case gives that case's label and, through its score sum, its exact feature value
    (``x0 = (logit(psum) - b) / a * scale + mean``). Returns per site the recovered (value, label) pairs."""
    from common.protocol import pack_weights

    study = classifier_study(score_bins=bins, calibration_bins=2)
    moments = ask("classifier_moments", {"model": "logistic"}, study)
    built = _classifier_payload(moments)
    if built is None:
        return {"recovered": {}, "error": _first_error(moments)}
    payload, scaling = built
    payload.update(pack_weights(_logistic_reading(scaling.mean.size, 0, a, b)))
    answer = ask("evaluate.classifier", payload, study)
    recovered: dict[str, list[list[float]]] = {}
    for site, reply in replies_of(answer).items():
        try:
            counts, psum = np.asarray(reply["counts"], float), np.asarray(reply["psum"], float)
        except (KeyError, TypeError, ValueError):
            continue
        rows = []
        for j in range(counts.shape[-1]):
            if counts[:, j].sum() == 1 and 0.0 < psum[:, j].sum() < 1.0:
                cls = int(np.argmax(counts[:, j]))
                p = float(psum[cls, j])
                rows.append([(math.log(p / (1.0 - p)) - b) / a * float(scaling.scale[0]) + float(scaling.mean[0]),
                             float(cls)])
        recovered[site] = rows
    return {"feature": scaling.names[0], "recovered": recovered, "answer": answer,
            "error": _first_error(answer) or _first_error(moments)}


def attack_fingerprint_extremes(ask: Ask) -> dict:
    """The fingerprint with percentiles 0 and 100 (each one voxel of one patient's tumour), and the honest
    fingerprint's ``<sequence>/min_max`` (the same two voxels in the old reply). Returns both answers."""
    extremes = ask("fingerprint", {}, study_of(phases=["fingerprint"], fingerprint={"percentiles": [0.0, 100.0]}))
    inner = ask("fingerprint", {}, study_of(phases=["fingerprint"]))
    return {"extremes": extremes, "inner": inner}


def attack_dp_bounds(ask: Ask) -> dict:
    """Training the site's patients past its privacy bounds, one ``train.classifier`` round each: without DP, a
    private step over ONE patient, DP at delta 0.9 (the epsilon then counted at 0.9), and two studies whose
    rounds each fit the site's ``max_epsilon`` but not together (an accountant per study adds nothing up).
    Returns each answer (without the weights) and the moments' training counts."""
    moments = ask("classifier_moments", {"model": "logistic"}, classifier_study())
    built = _classifier_payload(moments)
    out: dict[str, object] = {"n_train": {s: r.get("n") for s, r in replies_of(moments).items()},
                              "moments_error": _first_error(moments)}
    if built is None:
        return out
    payload = {**built[0], "round": 1}
    studies = {
        "no_dp": classifier_study("curious-no-dp", local_steps=DP_STEPS),
        "batch_one": dp_study("curious-batch-one", batch_size=1, noise_multiplier=BATCH_ONE_SIGMA),
        "delta_0.9": dp_study("curious-delta", delta=0.9),
        "study_a": dp_study("curious-study-a"),
        "study_b": dp_study("curious-study-b"),
    }
    for name, study in studies.items():
        answer = ask("train.classifier", payload, study)
        out[name] = {site: {k: v for k, v in reply.items() if not str(k).startswith("w/")}
                     for site, reply in answer.items()}
    return out


SEGMENTATION = {"rounds": 1, "patch_size": [16, 16, 16], "batch_size": 2, "threads": 1, "overlays": 0,
                "monai_channels": [4, 8], "sw_overlap": 0.0}
_PLAN_FINGERPRINT = {"n_cases": 12, "spacing_median": [1.0, 1.0, 1.0], "shape_median": [16, 16, 16],
                     "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                                       "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}}
                                   for s in ("T2w", "CET1")}}


def attack_small_counts(ask: Ask) -> dict:
    """A site's unlabelled cases from its fingerprint (``manifest_cases`` - ``n_cases``), then the inference
    round with any model (a freshly initialised one): with one unlabelled case, ``n_segmented`` / ``n_empty``
    say what the model made of that patient. Returns per site the unlabelled count, the counts and what follows
    from them for that one case (``inferred``: the exact number segmented, or None)."""
    from common.segmentation.inference import SEGMENT, inference_request
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan

    fingerprint = ask("fingerprint", {}, study_of(phases=["fingerprint"]))
    unlabelled: dict[str, int | None] = {}
    for site, reply in replies_of(fingerprint).items():
        try:
            unlabelled[site] = int(reply["manifest_cases"]) - int(reply["n_cases"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            unlabelled[site] = None
    study = study_of(phases=["segmentation"], segmentation=SEGMENTATION)
    plan = make_plan(_PLAN_FINGERPRINT, study)
    weights = get_weights(build_network(plan, seed=0))
    answer = ask(SEGMENT, inference_request(weights, plan), study)
    sites: dict[str, dict] = {}
    for site, reply in replies_of(answer).items():
        seg, empty, u = reply.get("n_segmented"), reply.get("n_empty"), unlabelled.get(site)
        inferred = None
        if isinstance(seg, int) and isinstance(empty, int):
            inferred = seg
        elif u is not None and isinstance(empty, int):
            inferred = u - empty  # the rest of the unlabelled cases were segmented
        elif u is not None and isinstance(seg, int):
            inferred = seg
        sites[site] = {"unlabelled": u, "n_segmented": seg, "n_empty": empty, "inferred": inferred}
    return {"sites": sites, "error": _first_error(answer) or _first_error(fingerprint)}

"""End to end on Flower's deployment engine: a real SuperLink and two hospital SuperNodes on loopback, over TLS
with SuperNode authentication, running studies submitted with ``flwr run``; then the faults a real network has.

One federation serves the whole module (starting one takes ~10-20 s); tests run in file order and each leaves
it as it found it (both sites connected, site.yaml unchanged). The fixture stops every process it started,
also when a test fails, and checks that none is left.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from client.steps import SITE_STEPS
from common.config import load_study_config
from common.fingerprint import aggregate_fingerprints
from common.sitedata import load_site_config, write_site_config
from common.validation import load_site
from deploy.app import app_hash
from deploy.local import LocalFederation
from deploy.processes import alive
from deploy.runs import RunOutcome
from deploy.supervision import DeploymentError
from server.registry import Registry, open_registry
from simulations.synthetic_features import synthetic_feature_sites
from tests.harmonisation.oracle import max_rel_diff, pooled_neurocombat

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SITE_A, SITE_B = "site-001", "site-002"


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Two simulated hospitals of 8 patients (policy min_cohort 3, so that a training round holds some out),
    each with a radiomics-like feature table in derived/ and age/scanner covariates in clinical.csv."""
    from simulations.phantoms import simulate_sites

    root = tmp_path_factory.mktemp("deploy-sites")
    sites = simulate_sites(root, sites=2, patients=8, size=32, seed=3)
    features, covariates = synthetic_feature_sites([8, 8], 8, seed=11, scanners=[["X"], ["Y"]])
    out = {}
    for site_dir, table, cov in zip(sites, features.values(), covariates.values(), strict=True):
        config = load_site_config(site_dir)
        write_site_config(config.model_copy(update={"policy": config.policy.model_copy(update={"min_cohort": 3})}),
                          site_dir)
        clinical = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})
        clinical["age"] = cov["age"].to_numpy()
        clinical["scanner"] = cov["scanner"].to_numpy()
        clinical.to_csv(site_dir / "clinical.csv", index=False)
        table = table.set_axis(pd.Index(clinical["patient_id"], name="patient_id"), axis=0)
        (site_dir / "derived").mkdir(exist_ok=True)
        table.to_csv(site_dir / "derived" / "features.csv")
        out[str(site_dir)] = (table, clinical.set_index("patient_id")[["age", "scanner"]])
    return out


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, site_data: dict) -> Iterator[LocalFederation]:
    """A running federation of the two sites (TLS + node authentication); stopped, and checked empty, at the end."""
    federation = LocalFederation([Path(p) for p in site_data], tmp_path_factory.mktemp("deploy") / "work", tls=True)
    pids: set[int] = set()
    try:
        federation.start()
        yield federation
    finally:
        pids = set(federation.processes.tagged_pids())
        federation.close()
    assert federation.processes.tagged_pids() == []
    assert not [p for p in pids if alive(p)], "a process of the federation survived close()"


def _study(tmp: Path, **settings: object) -> Path:
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "deploy-test", **settings}))
    return path


def _rounds(result_dir: Path) -> list[dict]:
    path = result_dir / "rollcall-rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def _verified_registry(result_dir: Path) -> Registry:
    """The study's registry (default folder ``<result_dir>/../registry``), after checking that it verifies."""
    registry = open_registry(result_dir.parent / "registry", create=False)
    report = registry.verify()
    assert report.ok, report.first
    return registry


class _Background:
    """``fed.run_study`` in a thread, so that the test can break things while the study runs."""

    def __init__(self, fed: LocalFederation, study: Path, result_dir: Path) -> None:
        self.outcome: RunOutcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fed, study, result_dir), daemon=True)
        self.thread.start()

    def _run(self, fed: LocalFederation, study: Path, result_dir: Path) -> None:
        try:
            self.outcome = fed.run_study(study, result_dir, timeout_s=400)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            self.error = err

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout_s: float = 450) -> RunOutcome:
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise AssertionError("the study did not end in time")
        return self.outcome


def test_study_over_tls_with_node_authentication(fed: LocalFederation, site_data: dict, tmp_path: Path) -> None:
    # Prepare: fingerprint and federated ComBat (a training round: the next test); and what the sites' data give
    study_path = _study(tmp_path, phases=["fingerprint", "harmonisation"], min_sites=2,
                        round_timeout_s=300, fingerprint={"foreground_samples_per_case": 500},
                        harmonisation={"batch": "scanner", "continuous": ["age"]})
    study = load_study_config(study_path)
    replies = {}
    for node in fed.nodes.values():
        site = load_site(node.data_path)
        replies[site.site_id] = SITE_STEPS["fingerprint"].run(site, study, {})
    expected = aggregate_fingerprints(replies, study.sequences)
    features = {Path(p).name: data[0] for p, data in site_data.items()}
    covariates = {Path(p).name: data[1] for p, data in site_data.items()}
    harmonised, _ = pooled_neurocombat(features, covariates, batch="scanner", continuous=["age"])

    # Execute
    outcome = fed.run_study(study_path, tmp_path / "results", timeout_s=500)

    # Assert: the run completed and computed what the sites' data give
    assert outcome.completed, f"{outcome.status}: " + "\n".join(outcome.log_lines[-40:])
    summary = outcome.summary()
    both = {SITE_A: 8, SITE_B: 8}
    assert summary["participants"]["fingerprint"] == summary["participants"]["harmonisation"] == both
    fp = summary["outputs"]["fingerprint"]
    assert fp["refused"] == {} and fp["dropped"] == []
    np.testing.assert_allclose(fp["spacing_mean"], expected["spacing_mean"], rtol=1e-12)
    for seq in study.sequences:
        assert fp["intensity"][seq]["mean"] == pytest.approx(expected["intensity"][seq]["mean"], rel=1e-12)
    # ComBat over the deployment equals neuroCombat on the pooled data (the harmonised tables stay at the sites)
    raw = pd.concat(features.values())
    got = pd.concat([pd.read_csv(n.data_path / "derived" / "features_harmonised.csv", dtype={"patient_id": str})
                     .set_index("patient_id") for n in fed.nodes.values()])
    assert max_rel_diff(got, harmonised, raw) <= 1e-8
    # the registry traces the plan and the ComBat model to both sites, and verifies
    with _verified_registry(tmp_path / "results") as registry:
        for kind in ("plan", "harmonisation"):
            versions = registry.versions(kind=kind)
            assert versions and all({s.site_id for s in v.sites} == {SITE_A, SITE_B} for v in versions), kind
    # the SuperLink speaks TLS only, with a certificate for 127.0.0.1 signed by the study CA
    assert fed.pki is not None
    context = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw_socket, \
            context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as tls:
        assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]  # type: ignore[index]
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw_socket, \
            pytest.raises(ssl.SSLCertVerificationError), \
            ssl.create_default_context().wrap_socket(raw_socket, server_hostname="127.0.0.1"):
        pass  # a client that does not trust the study CA is turned away
    assert "--enable-supernode-auth" in fed.superlink_command()
    assert "--disable-runtime-dependency-installation" in fed.superlink_command()
    assert fed.env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_hospitals_reach_only_the_fleet_api(fed: LocalFederation) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

    # Prepare: a Control API request without any credential (the flwr CLI's list-nodes)
    assert fed.pki is not None
    ca, body = str(fed.pki.ca_cert), ListNodesRequest().SerializeToString()
    headers = {"Content-Type": "application/protobuf"}

    # Execute / Assert: the SuperLink's own port answers it to anyone who reaches it (no login in OSS Flower:
    # node ids and public keys; start-run would take code), which is why it listens on loopback only ...
    direct = httpx.post(f"https://{fed.link_address}/v1/control/list-nodes", content=body, headers=headers,
                        verify=ca)
    assert direct.status_code == 200
    assert len(ListNodesResponse.FromString(direct.content).nodes_info) == len(fed.nodes)
    # ... while the address hospitals use refuses every path that is not exactly a Fleet API route
    probes = [("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/start-run"),
              ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/pull-messages"),
              ("POST", "/v1/fleet/../control/list-nodes"), ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
              ("POST", "//v1/control/list-nodes"), ("POST", "/v1/fleet//pull-messages"),
              ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/pull-messages?next=/v1/control/list-nodes"),
              ("GET", "/docs"), ("GET", "/openapi.json")]
    for method, path in probes:
        refused = httpx.request(method, f"https://{fed.address}{path}", content=body, headers=headers, verify=ca)
        assert refused.status_code == 403 and "only the Flower Fleet API" in refused.text, (method, path)
    assert httpx.get(f"https://{fed.address}/health", verify=ca).status_code == 200
    # every SuperNode of this module connects through that address (the studies above ran through it)
    assert all(f"--superlink {fed.address}" in " ".join(fed.supernode_command(n)) for n in fed.nodes)
    assert fed.address != fed.link_address


def test_only_superexec_secret_holders_are_given_tasks(fed: LocalFederation) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    # Prepare: a process on a hospital's (or the centre's) machine that asks for the next task -- it would get
    # the message, the run's FAB and the site's context -- without the SuperExec secret
    assert fed.pki is not None
    body = AcquireTaskRequest(supported_task_types=["flwr-clientapp", "flwr-serverapp"]).SerializeToString()
    headers = {"Content-Type": "application/protobuf"}

    # Execute / Assert: each SuperNode and the SuperLink refuse it
    for node in fed.nodes.values():
        refused = httpx.post(f"http://127.0.0.1:{node.port}/v1/runtime/acquire-task", content=body, headers=headers)
        assert refused.status_code == 401, node.name
    refused = httpx.post(f"https://{fed.link_address}/v1/runtime/acquire-task", content=body, headers=headers,
                         verify=str(fed.pki.ca_cert))
    assert refused.status_code == 401


def test_training_round_over_deployment(fed: LocalFederation, tmp_path: Path) -> None:
    # Prepare: one FedAvg round of a tiny MONAI U-Net (3 of 8 cases held out at each site)
    study_path = _study(tmp_path, phases=["fingerprint", "segmentation"], min_sites=2, round_timeout_s=600,
                        fingerprint={"foreground_samples_per_case": 500},
                        segmentation={"rounds": 1, "steps_per_epoch": 5, "patch_size": [32, 32, 32], "batch_size": 2,
                                      "holdout_fraction": 0.4, "overlays": 0, "threads": 1,
                                      "monai_channels": [8, 16, 32, 64]})

    # Execute
    outcome = fed.run_study(study_path, tmp_path / "results", timeout_s=900)

    # Assert: both sites trained and were evaluated; the model is registered with both as contributors
    assert outcome.completed, f"{outcome.status}: " + "\n".join(outcome.log_lines[-40:])
    summary = outcome.summary()
    assert summary["participants"]["segmentation"] == {SITE_A: 5, SITE_B: 5}
    seg = summary["outputs"]["segmentation"]
    assert [(a["kind"], a["round"]) for a in seg["artifacts"]] == [("plan", None), ("segmentation", 1)]
    assert set(seg["rounds"][-1]["train"]) == {SITE_A, SITE_B} and seg["rounds"][-1]["errors"] == []
    assert set(seg["artifacts"][-1]["metrics"]) == {SITE_A, SITE_B, "pooled"}
    with _verified_registry(tmp_path / "results") as registry:
        (model,) = registry.versions(kind="segmentation")
        assert {s.site_id for s in model.sites} == {SITE_A, SITE_B}


def test_message_outside_site_policy_is_refused_and_logged(fed: LocalFederation, tmp_path: Path) -> None:
    # Prepare: site A approves exactly the submitted app, site B approves only another app
    submitted = app_hash(fed.app_dir)  # type: ignore[arg-type]
    originals = {}
    for name, approved in ((SITE_A, submitted), (SITE_B, "0" * 64)):
        path = fed.nodes[name].data_path / "site.yaml"
        originals[path] = path.read_text()
        raw = yaml.safe_load(originals[path])
        raw["policy"]["approved_apps"] = [approved]
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    refusals = fed.nodes[SITE_B].data_path / "derived" / "policy-refusals.jsonl"
    study_path = _study(tmp_path, phases=["rollcall"], min_sites=1, round_timeout_s=300)
    try:
        # Execute
        outcome = fed.run_study(study_path, tmp_path / "results", timeout_s=400)
    finally:
        for path, text in originals.items():
            path.write_text(text)

    # Assert: A answered, from its authenticated node (the id the SuperLink gave its registered key), running
    # exactly the app `flwr run` submitted; B refused with an error reply naming the rule, and logged it
    assert outcome.completed, f"{outcome.status}: " + "\n".join(outcome.log_lines[-40:])
    (rnd,) = _rounds(tmp_path / "results")
    assert rnd["sites"] == {SITE_A: {"node": str(fed.nodes[SITE_A].node_id), "n_cases": 8, "app_hash": submitted}}
    node_b = str(fed.nodes[SITE_B].node_id)
    assert list(rnd["refused"]) == [node_b]
    assert "policy rule 'approved_apps'" in rnd["refused"][node_b] and SITE_B in rnd["refused"][node_b]
    entries = [json.loads(line) for line in refusals.read_text().splitlines()]
    assert [(e["rule"], e["message_type"], e["run_id"]) for e in entries] == \
        [("approved_apps", "query.rollcall", outcome.run_id)]
    assert not (fed.nodes[SITE_A].data_path / "derived" / "policy-refusals.jsonl").exists()


def test_site_killed_mid_round_then_rejoins_next_round(fed: LocalFederation, tmp_path: Path) -> None:
    # Prepare: two rounds; a round waits for a lost site at most until the SuperLink declares it gone
    # (its heartbeat lease, <= 60 s in Flower 1.42), and the pause lets it come back before the next one
    study_path = _study(tmp_path, phases=["rollcall"], min_sites=1, round_timeout_s=120,
                        rollcall={"rounds": 2, "pause_s": 15})
    results = tmp_path / "results"
    node_b = str(fed.nodes[SITE_B].node_id)
    received = fed.node_log(SITE_B).count("Receiving: query.rollcall")

    # Execute: kill site B's SuperNode (SIGKILL, with its children) as soon as round 1 reaches it
    run = _Background(fed, study_path, results)
    _wait(lambda: fed.node_log(SITE_B).count("Receiving: query.rollcall") > received or not run.alive(), 300,
          "round 1 to reach site B")
    fed.stop_node(SITE_B, crash=True)
    _wait(lambda: len(_rounds(results)) >= 1 or not run.alive(), 300, "round 1 to complete without site B")
    rejoined_as = fed.rejoin_node(SITE_B, timeout_s=120)
    outcome = run.result()

    # Assert: round 1 completed with site A alone and recorded B as dropped; B answered round 2 as the same node
    assert outcome.completed, f"{outcome.status}: " + "\n".join(outcome.log_lines[-40:])
    r1, r2 = _rounds(results)
    assert list(r1["sites"]) == [SITE_A] and r1["dropped"] == [node_b] and r1["refused"] == {}
    assert sorted(r2["sites"]) == [SITE_A, SITE_B] and r2["sites"][SITE_B]["node"] == node_b == str(rejoined_as)
    assert r2["dropped"] == []
    summary = json.loads((results / "rollcall.json").read_text())
    assert summary["dropped"] == [node_b]
    assert outcome.summary()["participants"]["rollcall"] == {SITE_A: 8, SITE_B: 8}


def test_node_with_unregistered_key_is_refused(fed: LocalFederation) -> None:
    # Prepare: a SuperNode with a valid TLS trust anchor and a well-formed key the SuperLink never registered
    intruder = fed.add_site(fed.nodes[SITE_B].data_path, name="intruder", register=False)
    assert intruder.private_key is not None and intruder.node_id is None

    # Execute / Assert: the SuperLink refuses to activate it; the registered sites stay connected
    with pytest.raises(DeploymentError, match="exited with code"):
        fed.start_node("intruder", wait=True)
    assert "Failed to activate SuperNode" in fed.node_log("intruder")
    assert not fed.node_running("intruder")
    assert fed.node_running(SITE_A) and fed.node_running(SITE_B)
    del fed.nodes["intruder"]


def test_superlink_restart_during_study_resumes(fed: LocalFederation, tmp_path: Path) -> None:
    # Prepare: two rounds that need both sites each time
    # (the pause keeps round 2 from finishing before the SuperLink is gone: a round takes ~1 s now)
    study_path = _study(tmp_path, phases=["rollcall"], min_sites=2, round_timeout_s=300,
                        rollcall={"rounds": 2, "pause_s": 10})
    results = tmp_path / "results"
    before = fed.processes.managed["superlink"].pid

    # Execute: crash the SuperLink (SIGKILL) after round 1 and start it again on its state database
    run = _Background(fed, study_path, results)
    _wait(lambda: len(_rounds(results)) >= 1 or not run.alive(), 300, "round 1")
    fed.restart_superlink(crash=True)
    outcome = run.result()

    # Assert: the ServerApp (in its own SuperExec) survived, the study resumed and completed with both sites
    assert fed.processes.managed["superlink"].pid != before and not alive(before)
    assert outcome.completed, f"{outcome.status}: " + "\n".join(outcome.log_lines[-40:])
    assert outcome.reattached >= 1
    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [1, 2]
    for rnd in rounds:
        assert {s: v["node"] for s, v in rnd["sites"].items()} == {n: str(fed.nodes[n].node_id) for n in fed.nodes}
    _verified_registry(results).close()  # the registry the surviving ServerApp kept writing still verifies

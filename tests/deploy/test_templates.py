"""The templates hospital IT installs: every command line parses with the installed Flower (or fedbiopsy's own
launchers), TLS and node authentication are on, telemetry and runtime dependency installation are off, the
SuperLink is reachable from outside only through the Fleet gateway, every SuperExec has its secret, no template
mounts the study CA's key, and the example site.yaml is valid."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from common.sitedata import ALL_PHASES, SiteConfig
from deploy.gateway import build_parser as gateway_parser
from deploy.site_exec import build_parser as site_exec_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "flower-superlink": superlink_parser, "flower-supernode": supernode_parser, "flower-superexec": superexec_parser,
    "deploy.supernode": supernode_parser, "deploy.gateway": gateway_parser, "deploy.site_exec": site_exec_parser,
}
UNITS = ["fedbiopsy-superlink.service", "fedbiopsy-superexec.service", "fedbiopsy-supernode.service",
         "fedbiopsy-gateway.service", "fedbiopsy-site-exec.service"]


def _unit(name: str) -> tuple[list[str], dict[str, str]]:
    text = (DEPLOY / "templates" / "systemd" / name).read_text().replace("\\\n", " ")
    service = {}
    env = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            k, _, v = value.partition("=")
            env[k] = v
        elif key in ("ExecStart", "Restart"):
            service[key] = value
    assert service["Restart"] == "always"
    return shlex.split(service["ExecStart"]), env


def _command(argv: list[str]) -> tuple[str, list[str]]:
    """(program, its arguments) of a command line; ``python -m deploy.x`` is program ``deploy.x``."""
    if Path(argv[0]).name.startswith("python") and argv[1] == "-m":
        return argv[2], argv[3:]
    return Path(argv[0]).name, argv[1:]


def _parse(argv: list[str]) -> argparse.Namespace:
    program, rest = _command(argv)
    return PARSERS[program]().parse_args(rest)


def _check_flower_flags(program: str, args: argparse.Namespace) -> None:
    if program in ("deploy.gateway", "deploy.site_exec"):
        assert not getattr(args, "insecure", False)
        return
    assert not args.insecure and args.runtime_dependency_install is False
    assert args.superexec_auth_secret_file, f"{program}: no SuperExec secret"


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_parse(unit: str) -> None:
    argv, env = _unit(unit)
    program, _ = _command(argv)
    args = _parse(argv)
    if program.startswith("flower-") or program == "deploy.supernode":
        assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    _check_flower_flags(program, args)
    assert not any("ca.key" in a for a in argv)
    if unit == "fedbiopsy-superlink.service":
        assert args.enable_supernode_auth and args.ssl_certfile and args.ssl_ca_certfile
        assert args.isolation == "process" and args.database.endswith("state.db")
        assert args.host == "127.0.0.1", "the SuperLink (Control API) must listen on loopback only"
    if unit == "fedbiopsy-gateway.service":
        assert args.listen == "0.0.0.0:8000" and args.upstream == "127.0.0.1:9092" and args.ca_certfile
    if unit == "fedbiopsy-supernode.service":
        assert program == "deploy.supernode" and args.isolation == "process"
        assert args.auth_supernode_private_key and args.root_certificates and args.host == "127.0.0.1"
        assert args.node_config == 'data-path="/srv/fedbiopsy/site"'
    if unit == "fedbiopsy-site-exec.service":
        assert args.runtime_api_address == "127.0.0.1:9094" and str(args.app_dir) == "/opt/fedbiopsy/app"
        assert env["PYTHONPATH"] == "/opt/fedbiopsy/app"


def test_compose_services_parse_and_only_the_gateway_is_public() -> None:
    compose = yaml.safe_load((DEPLOY / "templates" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "superlink", "superexec", "supernode", "site-exec"}
    for name, service in services.items():
        program, _ = _command(service["command"])
        _check_flower_flags(program, _parse(service["command"]))
        assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
        mounts = [v.split(":")[0] for v in service.get("volumes", []) if isinstance(v, str)]
        assert not any(m.rstrip("/") == "./pki" or "ca.key" in m for m in mounts), f"{name} mounts the CA key"
    assert _parse(services["superlink"]["command"]).enable_supernode_auth
    assert _parse(services["supernode"]["command"]).auth_supernode_private_key
    assert _parse(services["supernode"]["command"]).isolation == "process"
    assert services["site-exec"]["network_mode"] == "service:supernode"
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {"gateway": ["8000:8000"], "superlink": ["127.0.0.1:9092:9092"]}


def test_example_site_yaml_is_valid() -> None:
    config = SiteConfig.model_validate(yaml.safe_load((DEPLOY / "site.example.yaml").read_text()))
    assert set(config.policy.allowed_phases) <= set(ALL_PHASES)
    assert config.policy.min_cohort >= 5

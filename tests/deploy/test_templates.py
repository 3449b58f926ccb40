"""The templates hospital IT installs: every Flower command line parses with the installed Flower, TLS and node
authentication are on, telemetry and runtime dependency installation are off, and the example site.yaml is valid."""

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

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "flower-superlink": superlink_parser, "flower-supernode": supernode_parser, "flower-superexec": superexec_parser,
}


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


def _parse(argv: list[str]) -> argparse.Namespace:
    return PARSERS[Path(argv[0]).name]().parse_args(argv[1:])


@pytest.mark.parametrize("unit", ["fedbiopsy-superlink.service", "fedbiopsy-superexec.service",
                                  "fedbiopsy-supernode.service"])
def test_systemd_units_parse_with_flower(unit: str) -> None:
    argv, env = _unit(unit)
    args = _parse(argv)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert not args.insecure and args.runtime_dependency_install is False
    if unit == "fedbiopsy-superlink.service":
        assert args.enable_supernode_auth and args.ssl_certfile and args.ssl_ca_certfile
        assert args.isolation == "process" and args.database.endswith("state.db")
    if unit == "fedbiopsy-supernode.service":
        assert args.auth_supernode_private_key and args.root_certificates and args.host == "127.0.0.1"
        assert args.node_config == 'data-path="/srv/fedbiopsy/site"'


def test_compose_services_parse_with_flower() -> None:
    compose = yaml.safe_load((DEPLOY / "templates" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", "superexec", "supernode"}
    for name, service in services.items():
        args = _parse(service["command"])
        assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
        assert not args.insecure and args.runtime_dependency_install is False, name
    assert _parse(services["superlink"]["command"]).enable_supernode_auth
    assert _parse(services["supernode"]["command"]).auth_supernode_private_key


def test_example_site_yaml_is_valid() -> None:
    config = SiteConfig.model_validate(yaml.safe_load((DEPLOY / "site.example.yaml").read_text()))
    assert set(config.policy.allowed_phases) <= set(ALL_PHASES)
    assert config.policy.min_cohort >= 5

"""The real console script (`.venv/bin/spiffe-sidecar`) as a user runs it: check, explain, version, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
SCRIPT = Path(sys.executable).parent / "spiffe-sidecar"
CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"
REPORTING = "spiffe://example.org/ns/shop/sa/reporting"


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_SIDECAR_", "SPIFFE_ENDPOINT"))}
    full_env.update(env or {})
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=full_env, cwd=ROOT, check=False
    )


def test_version() -> None:
    result = sidecar("version")
    assert result.returncode == 0
    assert result.stdout.startswith("spiffe-sidecar ")


@pytest.mark.parametrize("name", ["inventory.yaml", "checkout.yaml", "reporting.yaml"])
def test_check_examples(name: str) -> None:
    result = sidecar("check", "-c", str(CONFIG / name), env={"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock"})
    assert result.returncode == 0, result.stderr
    assert f"{name}: OK" in result.stdout
    assert "default deny" in result.stdout  # the compiled policy is printed
    assert result.stderr == ""


def test_check_prints_the_compiled_policy_readably() -> None:
    result = sidecar("check", "-c", str(CONFIG / "inventory.yaml"))
    assert result.returncode == 0, result.stderr
    assert "checkout-reads-stock: allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout" in result.stdout
    assert "no-admin: deny" in result.stdout


BROKEN = """\
svid_source:
  workload_api: {socket: "unix://relative/agent.sock"}
inbound:
  listen: "0.0.0.0"
  app: "127.0.0.1:8080"
  policy:
    rules:
      - name: checkout-reads-stock
        action: allow
        methods: [GET]
        paths: ["/api/st*"]
        callers: ["spiffe://example.org/ns/shop/sa/checkout"]
timeouts: {drain: forever}
colour: blue
"""


def test_check_lists_every_problem_on_its_own_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(BROKEN)
    result = sidecar("check", "-c", str(config), env={"SPIFFE_SIDECAR_APP_PORT": "eighty"})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    expected_prefixes = [
        f"{config}:2: svid_source.workload_api.socket: ",
        f"{config}:4: inbound.listen: ",
        f"{config}:11: inbound.policy.rules[0].paths[0]: ",
        f"{config}:13: timeouts.drain: ",
        f"{config}:14: colour: ",
        "env SPIFFE_SIDECAR_APP_PORT: ",
    ]
    assert len(lines) == len(expected_prefixes) + 1, lines
    for line, prefix in zip(lines, expected_prefixes, strict=False):
        assert line.startswith(prefix), (line, prefix)
    assert lines[-1] == "6 problems found"


def test_run_with_a_broken_config_exits_2_before_starting(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(BROKEN)
    result = sidecar("run", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "5 problems found"
    assert "Traceback" not in result.stderr


def test_check_warns_about_a_non_loopback_admin(tmp_path: Path) -> None:
    text = (CONFIG / "inventory.yaml").read_text().replace('listen: "127.0.0.1:15000"', 'listen: "0.0.0.0:15000"')
    config = tmp_path / "inventory.yaml"
    config.write_text(text)
    (tmp_path / "inventory-policy.yaml").write_text((CONFIG / "inventory-policy.yaml").read_text())
    result = sidecar("check", "-c", str(config))
    assert result.returncode == 0
    assert result.stderr.startswith("warning: admin.listen 0.0.0.0:15000 is not a loopback address")


def test_check_missing_file_is_one_line() -> None:
    result = sidecar("check", "-c", "/nonexistent/side.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "/nonexistent/side.yaml: cannot read config: No such file or directory"


@pytest.mark.parametrize(
    ("caller", "method", "path", "code", "decision", "rule"),
    [
        (CHECKOUT, "GET", "/api/stock/42", 0, "allow", "checkout-reads-stock"),
        (CHECKOUT, "POST", "/api/stock/42", 1, "deny", "default-deny"),
        (REPORTING, "GET", "/api/stock/42", 1, "deny", "default-deny"),
        (CHECKOUT, "GET", "/admin/users", 1, "deny", "no-admin"),
        (CHECKOUT, "GET", "/api/stock/../../admin/users", 1, "deny", "no-admin"),  # normalised first
        (CHECKOUT, "GET", "/api/stock/%34%32?x=1", 0, "allow", "checkout-reads-stock"),
    ],
)
def test_explain(caller: str, method: str, path: str, code: int, decision: str, rule: str) -> None:
    result = sidecar(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", caller, "--method", method, "--path", path
    )
    assert result.returncode == code, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["decision"] == decision
    assert lines["rule"] == rule
    assert lines["reason"]


def test_explain_audit_mode_is_would_deny() -> None:
    result = sidecar(
        "explain", "-c", str(CONFIG / "reporting.yaml"), "--caller", "spiffe://other.org/x", "--method", "GET",
        "--path", "/reports/q3",
        env={"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "decision: would-deny" in result.stdout


def test_explain_target_the_sidecar_rejects() -> None:
    result = sidecar(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", CHECKOUT, "--method", "GET",
        "--path", "/api/stock%2F42",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.startswith("decision: reject (400")


@pytest.mark.parametrize(
    ("caller", "method"), [("spiffe://Example.org/x", "GET"), ("not-an-id", "GET"), (CHECKOUT, "GE T")]
)
def test_explain_bad_input_exits_2(caller: str, method: str) -> None:
    result = sidecar(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", caller, "--method", method, "--path", "/"
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: --")


def test_usage_error_exits_2() -> None:
    result = sidecar("explain", "-c", str(CONFIG / "inventory.yaml"))
    assert result.returncode == 2
    assert "--caller" in result.stderr


def test_unexpected_errors_are_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(_args: object) -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["version"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unexpected RuntimeError: kaboom (rerun with --debug to see the traceback)\n"
    assert cli.main(["version", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: unexpected RuntimeError: kaboom\n")


# --- Kubernetes subcommands (wired here; their behaviour is tested in test_inject_cli / test_webhook) -------


def test_inject_demo_manifest_exits_0_and_validates() -> None:
    import kubernetes_validate  # type: ignore[import-untyped]
    import yaml

    result = sidecar("inject", "-f", "helm/examples/demo.yaml", "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    injected = 0
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        names = [c["name"] for c in spec.get("initContainers", [])]
        if "spiffe-sidecar" in names:
            injected += 1
            (sc,) = [c for c in spec["initContainers"] if c["name"] == "spiffe-sidecar"]
            assert sc["args"][:2] == ["run", "--from-annotations"]
            env = {e["name"]: e for e in sc["env"]}
            assert env["SPIFFE_SIDECAR_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert injected == 3  # checkout, inventory, reporting


def test_injected_args_parse() -> None:
    # What the injector puts in the pod must be a valid command line for `run`.
    parser = cli._parser()
    args = parser.parse_args(["run", "--from-annotations", "/etc/spiffe-sidecar/annotations", "--log-level", "info"])
    assert (args.command, str(args.from_annotations), args.config) == ("run", "/etc/spiffe-sidecar/annotations", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "-c", "x.yaml", "--from-annotations", "y"])


def test_run_from_missing_annotations_file_is_one_line(tmp_path: Path) -> None:
    result = sidecar("run", "--from-annotations", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "cannot read the annotations file" in result.stderr and "Traceback" not in result.stderr


def test_webhook_serves_healthz_and_stops_on_sigterm(tmp_path: Path) -> None:
    import re
    import signal
    import time

    from tests.pki import CA

    leaf = CA.root("webhook.test").leaf("spiffe://webhook.test/webhook", dns=["spiffe-sidecar.spiffe-system.svc"])
    (tmp_path / "tls.crt").write_bytes(leaf.chain_pem())
    (tmp_path / "tls.key").write_bytes(leaf.key_pem())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_SIDECAR_", "SPIFFE_ENDPOINT"))}
    proc = subprocess.Popen(
        [str(SCRIPT), "webhook", "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key"),
         "--listen", "127.0.0.1:0", "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "listening" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        m = re.search(r"https://127\.0\.0\.1:(\d+)", line)
        assert m is not None, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        curl = subprocess.run(
            ["curl", "-sS", "-k", "--max-time", "10", f"https://127.0.0.1:{m.group(1)}/healthz"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert curl.returncode == 0, curl.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

"""The command line as a user meets it: check, explain, version, suggest-policy, callers, errors.

Commands that only parse and print run in-process through `sidecar.cli.main` (the `cli` fixture: same
arguments, environment filtering and working directory as the console script, stdout/stderr captured, the
exit status from the return value or SystemExit). A few tests run the real console script
(`.venv/bin/spiffe-sidecar`) as smoke tests of the installed entry point: version, `run` refusing a broken
config, and the long-running commands (webhook, run, callers --admin, inject).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar import cli
from tests.example import CHECKOUT, REPORTING
from tests.processes import SCRIPT, clean_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script as a subprocess (smoke tests of the entry point)."""
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=clean_env(env), cwd=ROOT, check=False
    )


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., CliResult]


@pytest.fixture
def cli_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """`sidecar.cli.main(args)` in this process, as `sidecar(*args, env=...)` runs the console script."""

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # main() points the root logger at stderr
        with monkeypatch.context() as m:
            for name in os.environ:
                if name.startswith(("SPIFFE_SIDECAR_", "SPIFFE_ENDPOINT")):
                    m.delenv(name)
            for name, value in (env or {}).items():
                m.setenv(name, value)
            m.chdir(ROOT)
            capsys.readouterr()
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse: usage errors (2), --version and --help (0)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                root.handlers[:] = handlers
                root.setLevel(level)
            out, err = capsys.readouterr()
        return CliResult(code, out, err)

    yield run


def test_version() -> None:
    result = sidecar("version")
    assert result.returncode == 0
    assert result.stdout.startswith("spiffe-sidecar ")


@pytest.mark.parametrize("name", ["inventory.yaml", "checkout.yaml", "reporting.yaml"])
def test_check_examples(cli_main: Cli, name: str) -> None:
    result = cli_main("check", "-c", str(CONFIG / name), env={"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock"})
    assert result.returncode == 0, result.stderr
    assert f"{name}: OK" in result.stdout
    assert "default deny" in result.stdout  # the compiled policy is printed
    audit = "warning: the policy is in audit mode: denials are logged as would-deny and the requests forwarded\n"
    assert result.stderr == (audit if name == "reporting.yaml" else "")


def test_check_prints_the_compiled_policy_readably(cli_main: Cli) -> None:
    result = cli_main("check", "-c", str(CONFIG / "inventory.yaml"))
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


def test_check_lists_every_problem_on_its_own_line(cli_main: Cli, tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(BROKEN)
    result = cli_main("check", "-c", str(config), env={"SPIFFE_SIDECAR_APP_PORT": "eighty"})
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


def test_check_warns_about_a_non_loopback_admin(cli_main: Cli, tmp_path: Path) -> None:
    text = (CONFIG / "inventory.yaml").read_text().replace('listen: "127.0.0.1:15000"', 'listen: "0.0.0.0:15000"')
    config = tmp_path / "inventory.yaml"
    config.write_text(text)
    (tmp_path / "inventory-policy.yaml").write_text((CONFIG / "inventory-policy.yaml").read_text())
    result = cli_main("check", "-c", str(config))
    assert result.returncode == 0
    assert result.stderr.startswith("warning: admin.listen 0.0.0.0:15000 is not a loopback address")


def test_check_missing_file_is_one_line(cli_main: Cli) -> None:
    result = cli_main("check", "-c", "/nonexistent/side.yaml")
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
def test_explain(cli_main: Cli, caller: str, method: str, path: str, code: int, decision: str, rule: str) -> None:
    result = cli_main(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", caller, "--method", method, "--path", path
    )
    assert result.returncode == code, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["decision"] == decision
    assert lines["rule"] == rule
    assert lines["reason"]


def test_explain_audit_mode_is_would_deny(cli_main: Cli) -> None:
    result = cli_main(
        "explain", "-c", str(CONFIG / "reporting.yaml"), "--caller", "spiffe://other.org/x", "--method", "GET",
        "--path", "/reports/q3",
        env={"SPIFFE_ENDPOINT_SOCKET": "unix:///run/agent.sock"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "decision: would-deny" in result.stdout


def test_explain_target_the_sidecar_rejects(cli_main: Cli) -> None:
    result = cli_main(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", CHECKOUT, "--method", "GET",
        "--path", "/api/stock%2F42",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.startswith("decision: reject (400")


@pytest.mark.parametrize(
    ("caller", "method"), [("spiffe://Example.org/x", "GET"), ("not-an-id", "GET"), (CHECKOUT, "GE T")]
)
def test_explain_bad_input_exits_2(cli_main: Cli, caller: str, method: str) -> None:
    result = cli_main(
        "explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", caller, "--method", method, "--path", "/"
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: --")


def test_usage_error_exits_2(cli_main: Cli) -> None:
    result = cli_main("explain", "-c", str(CONFIG / "inventory.yaml"))
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
    env = clean_env()
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


# --- the command line a newcomer meets ------------------------------------------------------------------


def test_version_flag_and_every_command_and_option_is_described(cli_main: Cli) -> None:
    result = cli_main("--version")
    assert result.returncode == 0 and result.stdout.startswith("spiffe-sidecar ")
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"{name}: no summary in the command list"
        assert p.description, f"{name}: no description"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_log_levels_any_case_and_json_logs(cli_main: Cli, tmp_path: Path) -> None:
    assert cli_main("check", "-c", str(CONFIG / "inventory.yaml"), "--log-level", "WARNING").returncode == 0
    assert cli_main("check", "-c", str(CONFIG / "inventory.yaml"), "--log-level", "Debug").returncode == 0
    bad = cli_main("check", "-c", str(CONFIG / "inventory.yaml"), "--log-level", "loud")
    assert bad.returncode == 2 and "invalid level 'loud'" in bad.stderr
    bad = cli_main("version", env={"SPIFFE_SIDECAR_LOG_FORMAT": "xml"})
    assert bad.returncode == 2 and "SPIFFE_SIDECAR_LOG_FORMAT" in bad.stderr


def test_missing_workload_api_socket_is_explained_once_in_json_logs(tmp_path: Path) -> None:
    import json
    import signal
    import time

    sock = tmp_path / "agent" / "spire-agent.sock"
    (tmp_path / "policy.yaml").write_text((CONFIG / "inventory-policy.yaml").read_text())
    config = tmp_path / "side.yaml"
    config.write_text(
        f'svid_source: {{workload_api: {{socket: "unix://{sock}"}}}}\n'
        'inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:8080", policy_file: policy.yaml}\n'
        'admin: {listen: "127.0.0.1:0"}\n'
    )
    env = clean_env()
    proc = subprocess.Popen([str(SCRIPT), "run", "-c", str(config), "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        time.sleep(4)  # several reconnect attempts (backoff starts well under a second)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    errors = [r for r in records if "stream_error" in r["message"]]
    assert len(errors) == 1, errors  # said once, not on every retry
    assert errors[0]["level"] == "warning"
    assert str(sock) in errors[0]["message"] and "SPIRE agent" in errors[0]["message"]
    assert "CSI" in errors[0]["message"] and "FileNotFoundError" not in err


BROKEN_ANNOTATIONS = """\
spiffe-sidecar.io/inbound-policy: |
  ALLOW GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout
  allow GET /x from spiffe://Example.org/ns/shop/sa/reporting
  deny * admin/** from *
spiffe-sidecar.io/polcy-mode: audit
"""


def test_check_file_every_source_kind(cli_main: Cli, tmp_path: Path) -> None:
    result = cli_main("check", "-f", "helm/examples/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": OK") == 3 and "Deployment/inventory: OK" in result.stdout
    assert "checkout-reads-stock: allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout" in result.stdout
    assert "EVERY REQUEST IS FORWARDED" in result.stderr  # reporting's audit-mode policy has no rules

    (tmp_path / "compact.txt").write_text(f"allow GET /api/stock/* from {CHECKOUT} as reads\n")
    (tmp_path / "policy.yaml").write_text((CONFIG / "inventory-policy.yaml").read_text())
    (tmp_path / "annotations").write_text(
        'spiffe-sidecar.io/inbound-policy="allow GET /api/stock/* from ' + CHECKOUT + '"\nother.io/x="1"'
    )  # the downward API file the injected sidecar reads
    for name in ("compact.txt", "policy.yaml", "annotations"):
        result = cli_main("check", "-f", str(tmp_path / name))
        assert result.returncode == 0, (name, result.stderr)
        assert f"{tmp_path / name}: OK" in result.stdout


def test_check_file_reports_every_problem_in_one_pass(cli_main: Cli, tmp_path: Path) -> None:
    path = tmp_path / "annotations.yaml"
    path.write_text(BROKEN_ANNOTATIONS)
    result = cli_main("check", "-f", str(path))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == "4 problems found", lines
    text = result.stderr
    assert "polcy-mode: unknown annotation (did you mean 'policy-mode'?)" in text
    assert "inbound-policy:1: a rule line starts with allow, deny or audit-deny, got 'ALLOW'" in text
    assert "got 'ALLOW' (did you mean 'allow'?)" in text
    assert "inbound-policy:2: rules[0].callers[0]" in text  # the semantic problems come out too
    assert "inbound-policy:3: rules[1].paths[0]" in text


def test_explain_file_picks_the_workload(cli_main: Cli) -> None:
    args = ["explain", "-f", "helm/examples/demo.yaml", "--caller", CHECKOUT, "--method", "GET", "--path",
            "/api/stock/42"]  # fmt: skip
    result = cli_main(*args)
    assert result.returncode == 2 and "Deployment/inventory" in result.stderr and "choose one of" in result.stderr
    result = cli_main(*args, "--workload", "Deployment/inventory")
    assert result.returncode == 0 and "rule: checkout-reads-stock" in result.stdout


def _audit_file(tmp_path: Path) -> Path:
    import json

    def line(peer: str, method: str, path: str, rule: str, decision: str, t: str) -> str:
        return json.dumps({"time": t, "listener": "inbound", "peer": peer, "method": method, "path": path,
                           "rule": rule, "decision": decision, "mode": "audit", "reason": "-", "status": 200,
                           "bytes_in": 0, "bytes_out": 9, "duration_ms": 0.3, "request_id": "x"})  # fmt: skip

    lines = [line(CHECKOUT, "GET", f"/api/stock/{i}", "default-deny", "would-deny", "2026-11-29T10:00:00.000Z")
             for i in range(12)]  # fmt: skip
    lines.append(line(REPORTING, "GET", "/reports/daily", "default-deny", "would-deny", "2026-11-29T10:01:00.000Z"))
    lines.append(line(REPORTING, "POST", "/admin/reset", "no-admin", "deny", "2026-11-29T10:02:00.000Z"))
    path = tmp_path / "audit.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_suggest_policy_prints_an_annotation_that_compiles(cli_main: Cli, tmp_path: Path) -> None:
    import yaml

    from sidecar.annotations import policy_from_annotations

    result = cli_main("suggest-policy", "--audit", str(_audit_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert f"allow GET /api/stock/* from {CHECKOUT} as checkout-get-api" in result.stdout
    assert f"allow GET /reports/daily from {REPORTING}" in result.stdout
    assert "# 12 requests, lines 1-12" in result.stdout and "not covered: 1 enforced denials" in result.stdout
    policy = policy_from_annotations(yaml.safe_load(result.stdout))
    assert [r.name for r in policy.rules] == ["checkout-get-api", "reporting-get-reports"]
    (tmp_path / "suggested.yaml").write_text(result.stdout)
    assert cli_main("check", "-f", str(tmp_path / "suggested.yaml")).returncode == 0


def test_callers_from_an_audit_log(cli_main: Cli, tmp_path: Path) -> None:
    import json

    result = cli_main("callers", "--audit", str(_audit_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    header, first, second = result.stdout.splitlines()
    assert header.split()[:4] == ["CALLER", "REQUESTS", "DENIED", "WOULD-DENY"]
    assert first.startswith(CHECKOUT) and first.split()[1:4] == ["12", "0", "12"]
    assert second.startswith(REPORTING) and "no-admin deny: 1" in second
    data = json.loads(cli_main("callers", "--audit", str(_audit_file(tmp_path)), "--json").stdout)
    assert data[1]["denied"] == 1 and data[1]["by_rule"][0]["rule"] == "default-deny"


async def test_callers_from_a_running_admin_endpoint_and_watch() -> None:
    import asyncio
    import signal

    from sidecar.admin import AdminServer
    from sidecar.config import HostPort
    from sidecar.metrics import Metrics

    metrics = Metrics()
    rec = metrics.recorder("inbound")
    for _ in range(3):
        rec.record(CHECKOUT, "allow", "checkout-reads-stock", "enforce", "GET", 200)
    rec.record(REPORTING, "deny", "default-deny", "enforce", "GET", 403)
    admin = AdminServer(HostPort("127.0.0.1", 0), metrics=metrics, svid_expiry=lambda: None,
                        listeners_bound=lambda: True, config_view=dict)  # fmt: skip
    port = await admin.start()
    env = clean_env()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "callers", "--admin", f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        lines = out.decode().splitlines()
        assert lines[1].startswith(CHECKOUT) and "checkout-reads-stock allow: 3" in lines[1] and "s ago" in lines[1]
        assert lines[2].startswith(REPORTING) and lines[2].split()[1:3] == ["1", "1"]

        watch = await asyncio.create_subprocess_exec(
            str(SCRIPT), "callers", "--admin", f"http://127.0.0.1:{port}", "--watch", "0.3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)  # fmt: skip
        await asyncio.sleep(1.5)
        rec.record(CHECKOUT, "allow", "checkout-reads-stock", "enforce", "GET", 200)  # seen by the next refresh
        await asyncio.sleep(1.0)
        watch.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(watch.communicate(), 20)
        assert watch.returncode == 130
        screens = out.decode().split("\x1b[H\x1b[2J")
        assert len(screens) >= 4 and "checkout-reads-stock allow: 4" in screens[-1]
    finally:
        await admin.stop()
    dead = sidecar("callers", "--admin", f"127.0.0.1:{port}")  # nothing listens any more
    assert dead.returncode == 1 and "is the sidecar running?" in dead.stderr


def test_explain_a_step_up_rule(cli_main: Cli, tmp_path: Path) -> None:
    base = ["explain", "-c", str(CONFIG / "inventory.yaml"), "--caller", CHECKOUT, "--method", "POST",
            "--path", "/api/stock/42/reserve"]  # fmt: skip
    result = cli_main(*base)
    assert result.returncode == 1
    assert "step-up: jwt aud=inventory sub=* " not in result.stdout  # bound is the default: not printed
    assert "step-up: jwt aud=inventory sub=*" in result.stdout
    assert "decision: deny (401, WWW-Authenticate: Bearer)" in result.stdout and "no valid JWT-SVID" in result.stdout
    result = cli_main(*base, "--jwt-subject", CHECKOUT)
    assert result.returncode == 0 and "decision: allow" in result.stdout
    result = cli_main(*base, "--jwt-subject", "spiffe://example.org/ns/shop/sa/reporting")
    assert result.returncode == 1 and "decision: deny (403)" in result.stdout and "not the mTLS peer" in result.stdout
    claims = base64.urlsafe_b64encode(json.dumps({"sub": CHECKOUT, "aud": ["inventory"]}).encode()).rstrip(b"=")
    token = tmp_path / "token"
    token.write_bytes(b"eyJhbGciOiJFUzI1NiJ9." + claims + b".c2ln")
    result = cli_main(*base, "--jwt-token", str(token))
    assert result.returncode == 0 and "decision: allow" in result.stdout
    token.write_text("not-a-token")
    result = cli_main(*base, "--jwt-token", str(token))
    assert result.returncode == 2 and "not a compact JWS" in result.stderr and "not-a-token" not in result.stderr


def test_explain_a_grpc_call(cli_main: Cli, tmp_path: Path) -> None:
    policy = tmp_path / "grpc-policy.txt"
    policy.write_text(f"allow grpc inventory.v1.Inventory/GetStock from {CHECKOUT} as stock\n"
                      "deny grpc inventory.v1.Admin/* from *\n")  # fmt: skip
    result = cli_main("explain", "-f", str(policy), "--caller", CHECKOUT, "--grpc", "inventory.v1.Inventory/GetStock")
    assert result.returncode == 0, result.stderr
    assert "decision: allow" in result.stdout and "rule: stock" in result.stdout
    result = cli_main("explain", "-f", str(policy), "--caller", CHECKOUT, "--grpc", "/inventory.v1.Admin/Reset")
    assert result.returncode == 1 and "rule: line-2" in result.stdout
    result = cli_main("explain", "-f", str(policy), "--caller", CHECKOUT, "--grpc", "inventory.v1.Admin/Reset",
                      "--method", "GET")  # fmt: skip
    assert result.returncode == 2 and "gRPC calls are POSTs" in result.stderr
    result = cli_main("explain", "-f", str(policy), "--caller", CHECKOUT, "--path", "/x")
    assert result.returncode == 2 and "--method is required" in result.stderr

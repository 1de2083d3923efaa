"""Command line: `spiffe-sidecar run|check|explain|callers|suggest-policy|version|demo|webhook|inject`.

`run --from-annotations FILE` is Kubernetes mode (what the injector puts in the pod): the policy, mode and
outbound targets come from the pod's downward API annotations file (reloaded live), ports and the
Workload API socket from the injected environment (sidecar/annotations.py `annotations_mode`).

Exit statuses: 0 success (explain: allowed), 1 failure (explain: denied), 2 bad input or a config with
problems (each printed on its own line to stderr). A user sees one readable line per error, never a
traceback, unless `--debug` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import logs
from .annotations import PodRuntime, annotations_mode
from .config import Settings, load_settings, warnings
from .errors import ConfigError, IdentityError, Problem, SidecarError
from .hints import policy_warnings
from .identity import SpiffeId
from .policy import AUDIT, Policy, Verdict

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    logs.add_arguments(common, level_help="log level; overrides log_level from the config")

    parser = argparse.ArgumentParser(
        prog="spiffe-sidecar",
        description="Per-pod SPIFFE mTLS sidecar with per-path caller allowlists. "
        "Start with `spiffe-sidecar demo`, or `check -f` on your manifest.",
        epilog="Run `spiffe-sidecar COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"spiffe-sidecar {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=summary, description=description)

    p = command("run", "run the sidecar until SIGTERM",
                "Serve mTLS for the app: fetch SVIDs, enforce the policy, forward allowed requests; drain and "
                "exit 0 on SIGTERM. Exit 1 on a runtime failure, 2 on a bad config (nothing started).")  # fmt: skip
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", type=Path, metavar="FILE", help="sidecar config file (YAML)")
    where.add_argument(
        "--from-annotations",
        type=Path,
        metavar="FILE",
        help="Kubernetes mode: the pod's downward API annotations file (the injector sets this up)",
    )
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop; asyncio to debug)"
    )

    def policy_source(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("-c", "--config", type=Path, metavar="FILE", help="sidecar config file (YAML)")
        where.add_argument("-f", "--file", type=Path, metavar="FILE",
                           help="a manifest (Deployment, Pod, ...), an annotations file (YAML or the downward API "
                           "file), compact policy lines, or a policy file")  # fmt: skip

    p = command("check", "validate a config, manifest or policy and print the compiled policy",
                "Validate and print the compiled policy. Every problem is listed with its file, annotation and "
                "line (exit 2); warnings (e.g. audit mode) go to stderr.")  # fmt: skip
    policy_source(p)

    p = command("explain", "explain the decision for one request",
                "Print the decision, rule and reason the policy gives one request (exit 0 allowed, 1 denied).")
    policy_source(p)
    p.add_argument("--caller", required=True, metavar="SPIFFE_ID", help="the caller's SPIFFE ID")
    p.add_argument("--method", metavar="METHOD", help="HTTP method, e.g. GET (with --grpc: POST, the default)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--path", metavar="PATH", help="request target as sent, e.g. /api/stock/42")
    target.add_argument("--grpc", metavar="SERVICE/METHOD",
                        help="a gRPC call, e.g. inventory.v1.Inventory/GetStock (the path /package.Service/Method)")
    p.add_argument("--workload", metavar="KIND/NAME",
                   help="with -f on a manifest of several workloads: which one (e.g. Deployment/inventory)")
    jwt = p.add_mutually_exclusive_group()
    jwt.add_argument("--jwt-subject", metavar="SPIFFE_ID",
                     help="for a step-up rule: the request carries a valid JWT-SVID for the rule's audience with "
                          "this subject")
    jwt.add_argument("--jwt-token", metavar="FILE", type=Path,
                     help="for a step-up rule: a JWT-SVID (compact form) whose sub and aud claims are used; its "
                          "signature and times are NOT checked here (the sidecar checks them)")

    p = command("callers", "who calls me: requests per caller, by rule and decision",
                "Each caller with its requests by rule and decision, denies and when it was last seen, from a "
                "running sidecar's admin endpoint (default) or from an audit log file.")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--admin", metavar="URL", default=None,
                     help="the sidecar's admin address (default http://127.0.0.1:$SPIFFE_SIDECAR_ADMIN_PORT or "
                     "15000, so `kubectl exec POD -c spiffe-sidecar -- spiffe-sidecar callers` works; host:port too)")
    src.add_argument("--audit", type=Path, metavar="FILE", help="read an audit log file instead")
    p.add_argument("--listener", default="inbound", help="which listener's callers (default inbound; 'all')")
    p.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("suggest-policy", "propose an allowlist from an audit log (run in audit mode first)",
                "The smallest allowlist covering every request the audit log saw allowed or would-deny, printed "
                "as the spiffe-sidecar.io/inbound-policy annotation, ready to paste. Enforced denials are not "
                "covered; callers never seen stay denied.")  # fmt: skip
    p.add_argument("--audit", required=True, type=Path, metavar="FILE", help="the audit log (JSON lines)")
    p.add_argument("--listener", default="inbound", help="which listener's requests (default inbound)")
    p.add_argument("--collapse", type=int, default=4, metavar="N",
                   help="N or more distinct path segments at one place become '*' (default 4)")

    command("version", "print the version", "Print the version (same as --version).")

    # Everything after `demo` that is not ours goes to sidecar.demo.main (see `main`).
    command("demo", "run the demo (embedded SPIRE + three workloads)",
            "Run the embedded development SPIRE and three workloads behind sidecars on loopback, check each "
            "step of the running example and print a table (exit 0 only if every step behaved).")  # fmt: skip

    # The injector needs jsonpatch; `run` must keep working in an image without it.
    p = command("webhook", "run the Kubernetes admission webhook (HTTPS)",
                "Serve the mutating admission webhook that injects the sidecar into opted-in pods.")
    with contextlib.suppress(ImportError):
        from .webhook import add_webhook_arguments

        add_webhook_arguments(p)
    p = command("inject", "inject the sidecar into Kubernetes manifests (offline)",
                "Inject the sidecar into the pod templates of a manifest, as the webhook would (for GitOps).")
    with contextlib.suppress(ImportError):
        from .inject_cli import add_inject_arguments

        add_inject_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.demo_args = extra
    debug: bool = args.debug
    try:
        env_level = logs.from_env(os.environ, logs.ENV_LOG_LEVEL, logs.LEVELS)
        env_format = logs.from_env(os.environ, logs.ENV_LOG_FORMAT, logs.FORMATS)
    except ValueError as exc:
        parser.error(str(exc))
    args.log_level = args.log_level or env_level
    args.log_format = args.log_format or env_format or "text"
    logs.setup(args.log_level or "info", args.log_format)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    except SidecarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"error: unexpected {type(exc).__name__}: {exc}"
            + ("" if debug else " (rerun with --debug to see the traceback)"),
            file=sys.stderr,
        )
        return EXIT_FAIL


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "version":
        print(f"spiffe-sidecar {_version()}")
        return EXIT_OK
    if command == "demo":
        if importlib.util.find_spec("spire") is None:  # the production image leaves the dev SPIRE out
            print("error: the demo needs the development SPIRE (spiffe-spire), which this installation does not "
                  "have: run it from a source checkout with `make demo`", file=sys.stderr)  # fmt: skip
            return EXIT_FAIL
        demo = importlib.import_module("sidecar.demo")  # written separately; imported only when asked for
        result: int = demo.main(list(args.demo_args))
        return result
    if command == "webhook":
        from .webhook import webhook_main

        return webhook_main(args)
    if command == "inject":
        from .inject_cli import inject_main

        return inject_main(args)
    if command == "callers":
        return _callers(args)
    if command == "suggest-policy":
        return _suggest(args)
    if command == "run" and args.from_annotations is not None:
        return _run_from_annotations(args.from_annotations, args.log_level, args.loop)
    if command in ("check", "explain") and args.file is not None:
        return _check_file(args.file) if command == "check" else _explain_file(args)
    settings = load_settings(args.config, os.environ)
    if args.log_level is None:
        logging.getLogger().setLevel(settings.log_level.upper())
    if command == "check":
        return _check(args.config, settings)
    if command == "explain":
        inbound = settings.inbound
        if inbound is None or inbound.policy is None:
            print("error: the config has no inbound policy to explain", file=sys.stderr)
            return EXIT_USAGE
        return _explain(inbound.policy, args.caller, args.method, args.path, args)
    return _run(settings, args.loop)


def _explain_target(args: argparse.Namespace) -> bool:
    """--grpc as --method POST --path /package.Service/Method; False (printed) on bad input."""
    if args.grpc is None:
        if args.method is None:
            print("error: --method is required with --path", file=sys.stderr)
            return False
        return True
    if args.method is not None and args.method != "POST":
        print(f"error: --method {args.method}: gRPC calls are POSTs (omit --method with --grpc)", file=sys.stderr)
        return False
    args.method = "POST"
    args.path = args.grpc if args.grpc.startswith("/") else "/" + args.grpc
    return True


def _no_core_dumps() -> None:
    """A core file or a same-uid debugger would expose the SVID private key: turn both off (Linux)."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_dumpable = 4
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _run(settings: Settings, loop: str, pod: PodRuntime | None = None) -> int:
    from .app import run  # the data plane is imported only by `run`

    _no_core_dumps()

    if loop == "asyncio":
        return asyncio.run(run(settings, environ=os.environ, pod=pod))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(settings, environ=os.environ, pod=pod))


def _run_from_annotations(path: Path, log_level: str | None, loop: str) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([Problem(str(path), f"cannot read the annotations file: {reason}")]) from None
    settings, pod = annotations_mode(text, os.environ, path, log_level=log_level or "info")
    return _run(settings, loop, pod)


def _check(path: Path, settings: Settings) -> int:
    for warning in warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    print(f"svid source: {_describe_source(settings)}")
    print(f"admin: {settings.admin.listen}")
    audit = settings.audit
    print(
        f"audit: {'stdout' if audit.path == '-' else audit.path}, allows sampled at {audit.sample_allows:g}, "
        f"denies limited to {audit.deny_per_second:g}/s (burst {audit.deny_burst})"
    )
    inbound = settings.inbound
    if inbound is None:
        print("inbound: none")
        return EXIT_OK
    print(f"inbound: {inbound.listen} -> app {inbound.app} ({inbound.mode.value})")
    origin = f"from {inbound.policy_file} (reloaded live)" if inbound.policy_file is not None else "inline"
    print(f"policy {origin}:")
    if inbound.policy is not None:
        _print_policy(inbound.policy)
    return EXIT_OK


def _print_policy(policy: Policy, indent: str = "  ") -> None:
    for line in _describe_policy(policy.describe()):
        if policy.mode == AUDIT and "every request is denied" in line:
            line = line.replace("every request is denied", "every request is forwarded (audit mode)")
        print(f"{indent}{line}")
    for warning in policy_warnings(policy):
        print(f"warning: {warning}", file=sys.stderr)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8") if str(path) != "-" else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([Problem(str(path), f"cannot read: {reason}")]) from None


def _check_file(path: Path) -> int:
    from .policyfile import load_policies

    for w in load_policies(_read(path), str(path)):
        print(f"{w.name}: OK")
        _print_policy(w.policy)
    return EXIT_OK


def _explain_file(args: argparse.Namespace) -> int:
    from .policyfile import load_policies

    workloads = load_policies(_read(args.file), str(args.file))
    if args.workload:
        chosen = [w for w in workloads if w.name.endswith(": " + args.workload) or w.name == args.workload]
    else:
        chosen = workloads
    if len(chosen) != 1:
        names = ", ".join(w.name.rsplit(": ", 1)[-1] for w in workloads)
        what = "matches none" if not chosen else "is ambiguous"
        print(f"error: --workload {args.workload or '(not given)'} {what}; choose one of: {names}", file=sys.stderr)
        return EXIT_USAGE
    return _explain(chosen[0].policy, args.caller, args.method, args.path, args)


def _describe_source(settings: Settings) -> str:
    from .config import WorkloadApiSettings

    src = settings.source
    if isinstance(src, WorkloadApiSettings):
        return f"Workload API at {src.endpoint}"
    td = f", trust domain {src.trust_domain.name}" if src.trust_domain is not None else ""
    return f"PEM files {src.cert_chain}, {src.key}, bundle {src.bundle}{td}"


def _describe_policy(described: object) -> list[str]:
    # Policy.describe() returns readable lines; accept a mapping too and print it as key: value.
    if isinstance(described, dict):
        return [f"{k}: {v}" for k, v in described.items()]
    if isinstance(described, list | tuple):
        return [str(x) for x in described]
    return [str(described)]


def _explain(policy: Policy, caller: str, method: str | None, raw_path: str | None,
             args: argparse.Namespace) -> int:  # fmt: skip
    from .http1 import BadRequest
    from .policy import check_jwt, explain

    if not _explain_target(args):
        return EXIT_USAGE
    method, raw_path = args.method, args.path
    assert isinstance(method, str) and isinstance(raw_path, str)
    try:
        peer = SpiffeId.parse(caller)
    except IdentityError as exc:
        print(f"error: --caller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not method or not method.isascii() or not method.isalpha():
        print(f"error: --method: {method!r} is not an HTTP method token", file=sys.stderr)
        return EXIT_USAGE
    try:
        decision = explain(policy, peer, method, raw_path)
    except BadRequest as exc:
        print("decision: reject (400 bad request: the sidecar never forwards this target)")
        print(f"reason: {exc}")
        return EXIT_FAIL
    status = ""
    if decision.jwt is not None:
        req = decision.jwt
        subject, problem = _explain_token(args, req.audience)
        if subject is _USAGE:
            return EXIT_USAGE
        print(f"step-up: {req.describe()}")
        assert not isinstance(subject, str)
        decision, challenge = check_jwt(decision, peer, subject, problem)
        if decision.verdict is Verdict.DENY:
            status = " (401, WWW-Authenticate: Bearer)" if challenge else " (403)"
    note = " (audit mode: logged, still forwarded)" if decision.verdict is Verdict.WOULD_DENY else status
    print(f"decision: {decision.verdict}{note}")
    print(f"rule: {decision.rule}")
    print(f"mode: {decision.mode}")
    print(f"reason: {decision.reason}")
    return EXIT_OK if decision.allowed else EXIT_FAIL


_USAGE: Final = "usage"


def _explain_token(args: argparse.Namespace, audience: str) -> tuple[SpiffeId | str | None, str]:
    """(the token subject to assume, why there is none) from --jwt-subject or --jwt-token; (_USAGE, "") on
    bad input (printed)."""
    if args.jwt_subject:
        try:
            return SpiffeId.parse(args.jwt_subject), ""
        except IdentityError as exc:
            print(f"error: --jwt-subject: {exc}", file=sys.stderr)
            return _USAGE, ""
    if args.jwt_token is None:
        return None, "no --jwt-subject or --jwt-token given"
    from .jwtsvid import unverified_claims

    try:
        claims = unverified_claims(_read(args.jwt_token).strip())
    except ValueError as exc:
        print(f"error: --jwt-token {args.jwt_token}: {exc}", file=sys.stderr)
        return _USAGE, ""
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []
    if audience not in auds:
        return None, f"the token's audience {auds} does not include {audience!r}"
    try:
        return SpiffeId.parse(str(claims.get("sub", ""))), ""
    except IdentityError as exc:
        return None, f"the token's subject is not a SPIFFE ID: {exc.reason}"


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(str(problem), file=sys.stderr)
    n = len(exc.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)


def _callers(args: argparse.Namespace) -> int:
    import json
    import time

    from .callers import render_table, rows_from_admin, rows_from_audit, summarise

    listener = None if args.listener == "all" else args.listener
    admin = args.admin or f"http://127.0.0.1:{os.environ.get('SPIFFE_SIDECAR_ADMIN_PORT', '').strip() or 15000}"

    def once() -> str:
        if args.audit is not None:
            from .auditlog import parse_lines

            rows = rows_from_audit(parse_lines(_read(args.audit).splitlines()).records)
        else:
            rows = rows_from_admin(_fetch_callers(admin))
        summaries = summarise(rows, listener=listener)
        if args.json:
            return json.dumps([
                {"caller": s.caller, "requests": s.requests, "denied": s.denied, "would_deny": s.would_deny,
                 "last_seen": s.last_seen or None,
                 "by_rule": [{"rule": r, "decision": d, "requests": n} for (r, d), n in sorted(s.by_rule.items())]}
                for s in summaries
            ], indent=2) + "\n"  # fmt: skip
        return render_table(summaries, now=time.time())

    if args.watch is None:
        sys.stdout.write(once())
        return EXIT_OK
    interval = max(0.2, args.watch)
    while True:  # until Ctrl-C (main() turns it into 130)
        text = once()
        stamp = time.strftime("%H:%M:%S")
        source = args.audit or admin
        sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  callers of {source} (every {interval:g}s, Ctrl-C to stop)\n\n{text}")
        sys.stdout.flush()
        time.sleep(interval)


def _fetch_callers(admin: str) -> dict[str, object]:
    import json
    import urllib.error
    import urllib.request

    base = admin if "://" in admin else f"http://{admin}"
    url = base.rstrip("/") + "/callers"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - an operator-given admin URL
            data = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SidecarError(f"cannot read {url}: {reason} (is the sidecar running? its admin address?)") from None
    if not isinstance(data, dict):
        raise SidecarError(f"{url}: not a /callers answer")
    return data


def _suggest(args: argparse.Namespace) -> int:
    from .auditlog import parse_lines
    from .suggest import render_annotation, suggest

    if args.collapse < 2:
        print("error: --collapse must be at least 2", file=sys.stderr)
        return EXIT_USAGE
    parsed = parse_lines(_read(args.audit).splitlines())
    result = suggest(parsed.records, listener=args.listener, many=args.collapse)
    sys.stdout.write(render_annotation(result, str(args.audit)))
    if parsed.skipped:
        print(f"note: {parsed.skipped} lines were not decision records (skipped)", file=sys.stderr)
    if result.ignored:
        print(f"note: {result.ignored} decisions of other listeners or without a caller identity (skipped)",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _version() -> str:
    try:
        return importlib.metadata.version("spiffe-sidecar")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+unknown"

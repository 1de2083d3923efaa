"""Command line: `spiffe-sidecar run|check|explain|version|demo|webhook|inject`.

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
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .annotations import PodRuntime, annotations_mode
from .config import LOG_LEVELS, Settings, load_settings, warnings
from .errors import ConfigError, IdentityError, Problem, SidecarError
from .identity import SpiffeId

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    common.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log_level from the config")

    parser = argparse.ArgumentParser(
        prog="spiffe-sidecar", description="Per-pod SPIFFE mTLS sidecar with per-path caller allowlists."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run the sidecar until SIGTERM")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", type=Path, metavar="FILE")
    where.add_argument(
        "--from-annotations",
        type=Path,
        metavar="FILE",
        help="Kubernetes mode: the pod's downward API annotations file (the injector sets this up)",
    )
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop; asyncio to debug)"
    )

    p = sub.add_parser("check", parents=[common], help="validate a config and print the compiled policy")
    p.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")

    p = sub.add_parser("explain", parents=[common], help="explain the decision for one request")
    p.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    p.add_argument("--caller", required=True, metavar="SPIFFE_ID", help="the caller's SPIFFE ID")
    p.add_argument("--method", required=True, metavar="METHOD", help="HTTP method, e.g. GET")
    p.add_argument("--path", required=True, metavar="PATH", help="request target as sent, e.g. /api/stock/42")

    sub.add_parser("version", parents=[common], help="print the version")

    # Everything after `demo` that is not ours goes to sidecar.demo.main (see `main`).
    sub.add_parser("demo", parents=[common], help="run the demo (embedded SPIRE + three workloads)")

    # The injector needs jsonpatch; `run` must keep working in an image without it.
    p = sub.add_parser("webhook", parents=[common], help="run the Kubernetes admission webhook (HTTPS)")
    with contextlib.suppress(ImportError):
        from .webhook import add_webhook_arguments

        add_webhook_arguments(p)
    p = sub.add_parser("inject", parents=[common], help="inject the sidecar into Kubernetes manifests (offline)")
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
    _setup_logging(args.log_level or "info")
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
        demo = importlib.import_module("sidecar.demo")  # written separately; imported only when asked for
        result: int = demo.main(list(args.demo_args))
        return result
    if command == "webhook":
        from .webhook import webhook_main

        return webhook_main(args)
    if command == "inject":
        from .inject_cli import inject_main

        return inject_main(args)
    if command == "run" and args.from_annotations is not None:
        return _run_from_annotations(args.from_annotations, args.log_level, args.loop)
    settings = load_settings(args.config, os.environ)
    if args.log_level is None:
        logging.getLogger().setLevel(settings.log_level.upper())
    if command == "check":
        return _check(args.config, settings)
    if command == "explain":
        return _explain(settings, args.caller, args.method, args.path)
    return _run(settings, args.loop)


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
        for line in _describe_policy(inbound.policy.describe()):
            print(f"  {line}")
    return EXIT_OK


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


def _explain(settings: Settings, caller: str, method: str, raw_path: str) -> int:
    from .http1 import BadRequest
    from .policy import explain

    inbound = settings.inbound
    if inbound is None or inbound.policy is None:
        print("error: the config has no inbound policy to explain", file=sys.stderr)
        return EXIT_USAGE
    try:
        peer = SpiffeId.parse(caller)
    except IdentityError as exc:
        print(f"error: --caller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not method or not method.isascii() or not method.isalpha():
        print(f"error: --method: {method!r} is not an HTTP method token", file=sys.stderr)
        return EXIT_USAGE
    try:
        decision = explain(inbound.policy, peer, method, raw_path)
    except BadRequest as exc:
        print("decision: reject (400 bad request: the sidecar never forwards this target)")
        print(f"reason: {exc}")
        return EXIT_FAIL
    if decision.allowed:
        verdict = "allow"
    elif decision.enforced:
        verdict = "deny"
    else:
        verdict = "would-deny (audit mode: logged, still forwarded)"
    print(f"decision: {verdict}")
    print(f"rule: {decision.rule}")
    print(f"mode: {decision.mode}")
    print(f"reason: {decision.reason}")
    return EXIT_OK if decision.allowed else EXIT_FAIL


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(str(problem), file=sys.stderr)
    n = len(exc.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _version() -> str:
    try:
        return importlib.metadata.version("spiffe-sidecar")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+unknown"

"""`spiffe-spire`: run or check the embedded development SPIRE.

    spiffe-spire run --entries FILE [--socket-dir DIR | --socket PATH] [--trust-domain TD]
                     [--svid-ttl 1h] [--jwt-ttl 5m] [--ca-ttl 24h] [--jwt-key-ttl 24h] [--bundle-out PEM]
                     [--loop uvloop|asyncio] [--log-level LEVEL] [--log-format text|json]
    spiffe-spire check --entries FILE [same overrides]

Logs have spiffe-sidecar's format, level names (any case) and flags (sidecar/logs.py).

Exit codes: 0 ok (run: stopped by SIGTERM/SIGINT), 1 runtime failure, 2 bad usage or bad entries file
(one problem per line on stderr, nothing started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sidecar import logs
from sidecar.errors import ConfigError, SidecarError

from .entries import SpireConfig, load_config, parse_duration
from .server import EmbeddedSpire

log = logging.getLogger("spire")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spiffe-spire", description="Embedded development SPIRE (not for production).")
    p.add_argument("--version", action="version", version=f"spiffe-spire {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--entries", required=True, help="registration entries YAML file")
    common.add_argument("--trust-domain", help="override the file's trust_domain")
    common.add_argument("--svid-ttl", type=_duration, help="X509-SVID lifetime, e.g. 1h (rotation at half-life)")
    common.add_argument("--jwt-ttl", type=_duration, help="JWT-SVID lifetime, e.g. 5m")
    common.add_argument("--ca-ttl", type=_duration, help="signing CA lifetime, e.g. 24h")
    common.add_argument("--jwt-key-ttl", type=_duration,
                        help="JWT signing key lifetime, e.g. 24h (a new kid is published at half-life)")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--socket-dir", help="directory of the shared socket api.sock and relative entry sockets")
    where.add_argument("--socket", help="path of the shared Workload API socket")
    run = sub.add_parser("run", parents=[common], help="serve the Workload API until SIGTERM/SIGINT",
                         description="Serve the SPIFFE Workload API on unix sockets, issuing and rotating SVIDs "
                         "for the registration entries, until SIGTERM/SIGINT (exit 0).")  # fmt: skip
    run.add_argument("--bundle-out", help="keep the trust domain's CA bundle (PEM) in this file")
    run.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                     help="event loop (default uvloop; asyncio to debug)")  # fmt: skip
    logs.add_arguments(run, level_help="log level (default info)")
    sub.add_parser("check", parents=[common], help="validate the entries file and exit",
                   description="Validate the registration entries file: every problem as file:line: field: "
                   "message (exit 2), or one OK line.")  # fmt: skip
    return p


def _load(args: argparse.Namespace) -> SpireConfig:
    return load_config(
        args.entries,
        trust_domain=args.trust_domain,
        svid_ttl=args.svid_ttl,
        jwt_ttl=args.jwt_ttl,
        ca_ttl=args.ca_ttl,
        jwt_key_ttl=args.jwt_key_ttl,
        socket_dir=args.socket_dir,
        socket=args.socket,
    )


def _write_public_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` (public material only: CA certificates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def _run(config: SpireConfig, bundle_out: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    spire = EmbeddedSpire(config)
    if bundle_out is not None:
        out = Path(bundle_out)

        def write_bundle() -> None:
            _write_public_file(out, spire.bundle_pem())

        write_bundle()
        spire.on_change(write_bundle)
    await spire.start()
    try:
        log.info("ready: trust_domain=%s sockets=%s", config.trust_domain,
                 ",".join(str(p) for p in spire.socket_paths))
        await stop.wait()
        log.info("stopping")
    finally:
        await spire.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.command == "check":
        names = ", ".join(str(e.spiffe_id) for e in config.entries)
        print(f"{args.entries}: ok: trust domain {config.trust_domain}, {len(config.entries)} entries ({names})")
        return 0
    if config.socket is None and config.socket_dir is None:
        print(f"{args.entries}: no socket: give --socket-dir DIR or --socket PATH (or socket_dir in the file)",
              file=sys.stderr)
        return 2
    try:
        level = args.log_level or logs.from_env(os.environ, logs.ENV_LOG_LEVEL, logs.LEVELS) or "info"
        fmt = args.log_format or logs.from_env(os.environ, logs.ENV_LOG_FORMAT, logs.FORMATS) or "text"
    except ValueError as e:
        print(f"spiffe-spire: {e}", file=sys.stderr)
        return 2
    logs.setup(level, fmt)
    logging.getLogger("grpclib").setLevel(logging.WARNING)  # per-stream cancel chatter
    try:
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(_run(config, args.bundle_out))
        return asyncio.run(_run(config, args.bundle_out))
    except (SidecarError, OSError) as e:
        print(f"spiffe-spire: {e}", file=sys.stderr)
        return 1


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("spiffe-sidecar")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


if __name__ == "__main__":
    sys.exit(main())

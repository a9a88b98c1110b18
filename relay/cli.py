"""argv and environment -> Config -> event loop -> Server. The only place that picks exit codes.

Exit codes: 0 clean stop, 1 runtime failure (a port already in use), 2 bad configuration (one line on
stderr naming the source, the value and the expected form; no traceback), 75 the app container restarted
(EX_TEMPFAIL: Docker's restart policy starts the relay again in the app's new network namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from relay import __version__, logs, socat
from relay.config import OPTIONS, Config, ConfigError, Raw, load

if TYPE_CHECKING:
    from relay.server import Server

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
EXIT_APP_RESTARTED = 75
COMMANDS = ("run", "check", "healthcheck")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"command line: {message}; see 'relay --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relay",
        usage="relay [run|check|healthcheck] [options]  |  relay [-d] TCP-LISTEN:PORT[,opts] TCP:HOST:PORT",
        allow_abbrev=False,
        description="Forward localhost ports to the Docker host. Also accepts socat's arguments: "
        "relay -d tcp-listen:8000,fork,reuseaddr tcp-connect:host.docker.internal:8000",
        epilog="Every option has an environment variable RELAY_<NAME> (e.g. RELAY_PORTS); command line wins "
        "over environment, which wins over the config file. Commands: run (default), check, healthcheck.",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (env RELAY_CONFIG)")
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.key, metavar=opt.metavar, help=f"{opt.help} (env {opt.env})")
    parser.add_argument("-d", "--debug", action="store_true", help="log every connection (log level debug)")
    parser.add_argument("--version", action="version", version=f"relay-sidecar {__version__}")
    return parser


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Config, Callable[[], Config]]:
    """(command, config, reloader): the reloader re-reads the file and environment with the same argv."""
    args = list(argv)
    if socat.looks_like_socat(args):
        parsed = socat.parse(args)
        cli = dict(parsed.raw)
        if parsed.debug_level >= 2:
            cli["log_level"] = Raw("debug", "socat argument -d -d")
        command, config_path = "run", None
        notes = parsed.notes
    else:
        command = args.pop(0) if args and args[0] in COMMANDS else "run"
        ns = build_parser().parse_args(args)
        cli = {
            opt.key: Raw(getattr(ns, opt.key), opt.flag)
            for opt in OPTIONS
            if getattr(ns, opt.key) is not None
        }
        if ns.debug:
            cli["log_level"] = Raw("debug", "-d")
        config_path, notes = ns.config, ()

    def reload() -> Config:
        return load(cli, environ, config_path, need_routes=command != "healthcheck")

    config = reload()
    if notes:
        config = replace(config, warnings=(*config.warnings, *notes))
    return command, config, reload


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when asked for or (auto) when installed; else the standard loop."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise ConfigError("loop: 'uvloop' is not installed; expected auto or asyncio") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def run_on_loop(factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    from relay.server import Server

    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        command, config, reload = parse(argv, environ)
        factory = loop_factory(config.loop)
    except ConfigError as err:
        print(f"relay: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.log_level, config.log_format)
    if command == "check":
        from relay.check import run_check

        return run_on_loop(factory, run_check(config))
    if command == "healthcheck":
        from relay.health import healthcheck

        return healthcheck(config)

    async def serve() -> int:
        return await run_server(Server(config, reload=reload))

    return run_on_loop(factory, serve())


async def run_server(server: Server) -> int:
    """Serve until stopped; the exit code says why it stopped."""
    from relay.listener import ListenError
    from relay.netwatch import APP_RESTARTED

    try:
        await server.serve()
    except ListenError as err:
        logs.log.error("%s", err)
        return EXIT_FAILURE
    return EXIT_APP_RESTARTED if server.exit_reason == APP_RESTARTED else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

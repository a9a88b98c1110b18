"""argv and environment -> Config -> event loop -> Server. The only place that picks exit codes.

Exit codes: 0 clean stop, 1 runtime failure (a port already in use), 2 bad configuration (one line on
stderr naming the source, the value and the expected form; no traceback), 75 the app container restarted
(EX_TEMPFAIL: Docker's restart policy starts the relay again in the app's new network namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import textwrap
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from relay import __version__, logs, socat
from relay.address import EXCERPT_CHARS
from relay.config import OPTIONS, Config, ConfigError, Raw, load

if TYPE_CHECKING:
    from relay.server import Endpoint, Server

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
EXIT_APP_RESTARTED = 75
COMMANDS = ("run", "check", "healthcheck")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse copies arguments into its message as they are: a line break in one made two lines, a
        # long one a line as long.
        message = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
        if len(message) > 2 * EXCERPT_CHARS:
            message = f"{message[: 2 * EXCERPT_CHARS]}... ({len(message)} characters)"
        raise ConfigError(f"command line: {message}; see '{self.prog} --help'")


PRECEDENCE = (
    "Every option has an environment variable RELAY_<NAME> (e.g. RELAY_PORTS); the command line wins over "
    "the environment, which wins over the config file."
)
SOCAT_HELP = """socat-style arguments (a compose file written for alpine/socat only swaps its image):
  relay [-d...] [-b N] [-t S] [-T S] [-4|-6] TCP-LISTEN:PORT[,opts] TCP:HOST:PORT[,opts]
  relay [-d...] [-T S] [-4|-6] UDP-LISTEN:PORT[,opts] UDP:HOST:PORT   (also UDP4-/UDP6-LISTEN,
        UDP-RECVFROM:PORT,fork; UDP-CONNECT, UDP4, UDP6, UDP-SENDTO; -T is the UDP session idle timeout)
  -d          keep info logs; -d -d logs every connection
  -b N        accepted, no effect (reads are up to 256 KiB)
  -t S        close a half-closed connection after S seconds (socat's default 0.5 s is not applied)
  -T S        idle timeout: close a connection idle for S seconds
  -4, -6      reach the target over IPv4 / IPv6 only
  -v, -x      ignored with a warning (data dumps)
  listen options: fork, reuseaddr, reuseport, bind=IP, backlog=N, max-children=N, keepalive, nodelay
  connect options: connect-timeout=S, retry=N, interval=S, forever, keepalive, nodelay"""
# command -> (one line for the command list, description, epilog)
COMMAND_HELP = {
    "run": (
        "forward localhost ports to the Docker host (the default)",
        "Forward localhost ports to the Docker host (the default command).",
        f"{PRECEDENCE}\n\n{SOCAT_HELP}",
    ),
    "check": (
        "show the configuration and why each target does or does not answer",
        "Show the configuration as understood and how each target resolves, then probe every target port "
        "and print the likely cause and fix of each failure. Exit 0 when every target answers, 1 when one "
        "does not, 2 on a configuration error.",
        PRECEDENCE,
    ),
    "healthcheck": (
        "ask a running relay's /readyz (the image's HEALTHCHECK)",
        "Ask the running relay's /readyz at the metrics address (RELAY_METRICS, default 0.0.0.0:9464); exit "
        "0 when it is ready, 1 when not or when nothing answers. The image's HEALTHCHECK runs this.",
        PRECEDENCE,
    ),
}
HEALTHCHECK_KEYS = {"metrics"}
HELP_WIDTH = 100


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for one command; without a command, `relay`'s own (run, plus the list of commands)."""
    _, description, epilog = COMMAND_HELP[command or "run"]
    description = textwrap.fill(description, HELP_WIDTH)
    epilog = "\n\n".join(
        textwrap.fill(part, HELP_WIDTH) if "\n" not in part else part for part in epilog.split("\n\n")
    )
    if command is None:
        prog = "relay"
        usage = "relay [run|check|healthcheck] [options]  |  relay [-d] TCP-LISTEN:PORT[,opts] TCP:HOST:PORT"
        description = (
            "Forward localhost ports to the Docker host.\n\ncommands (each has its own --help):\n"
            + ("\n".join(f"  {name:<12} {COMMAND_HELP[name][0]}" for name in COMMANDS))
        )
    else:
        prog, usage = f"relay {command}", None
    parser = _Parser(
        prog=prog,
        usage=usage,
        allow_abbrev=False,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (env RELAY_CONFIG)")
    for opt in OPTIONS:
        shown = command != "healthcheck" or opt.key in HEALTHCHECK_KEYS
        parser.add_argument(
            opt.flag,
            dest=opt.key,
            metavar=opt.metavar,
            # A yes/no setting also works as a bare flag: `--keepalive` is `--keepalive on`.
            nargs="?" if opt.metavar == "BOOL" else None,
            const="on" if opt.metavar == "BOOL" else None,
            help=f"{opt.help} (env {opt.env})" if shown else argparse.SUPPRESS,
        )
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
        named = args.pop(0) if args and args[0] in COMMANDS else None
        command = named or "run"
        ns = build_parser(named).parse_args(args)
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
        from relay.probe import healthcheck

        return healthcheck(config.metrics)

    async def serve() -> int:
        server = Server(config, reload=reload, endpoint=http_endpoint)
        server.ignore_late_signals = True
        return await run_server(server)

    # The modules and the config live as long as the process: out of the collector's sight, a full
    # collection takes ~1 ms instead of ~9 ms under load (issue 13, docs/benchmarks.md).
    gc.freeze()
    return run_on_loop(factory, serve())


def http_endpoint(server: Server) -> Endpoint:
    """/metrics, /healthz and /readyz for `server`, imported when first served (prometheus-client costs
    ~50 ms of start-up, and metrics may be off until a reload turns them on)."""
    from relay.health import HealthServer

    return HealthServer(server)


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

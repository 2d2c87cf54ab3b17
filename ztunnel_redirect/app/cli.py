"""The `ztunnel-redirect` command: the operator's tool on a node, and what tests, the demo and the
benchmark drive.

Exit codes: 0 success (for `check`: everything in place), 1 `check` found drift, 2 error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ztunnel_redirect import __version__
from ztunnel_redirect.adapters import logs
from ztunnel_redirect.adapters.cniinstall import CniInstaller
from ztunnel_redirect.app import agent
from ztunnel_redirect.app.cleanup import cleanup
from ztunnel_redirect.core import constants, settings
from ztunnel_redirect.core.drift import Drift
from ztunnel_redirect.core.errors import ConfigError, NetnsNotFoundError, RedirectError
from ztunnel_redirect.core.model import (
    MAX_UID,
    HostOptions,
    PodOptions,
    PodUid,
    valid_interface_name,
)
from ztunnel_redirect.core.render import host_ruleset, pod_ruleset
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.nft import probe
from ztunnel_redirect.kernel.podrules import PodRules

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one clear line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _interfaces(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if not valid_interface_name(name):
            raise argparse.ArgumentTypeError(f"not a valid interface name: {name!r}")
    return names


def _pod_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ipv6", action=argparse.BooleanOptionalAction, default=True, help="IPv6 twins of rules"
    )
    parser.add_argument(
        "--dns-capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="redirect DNS to ztunnel's proxy on 15053",
    )
    parser.add_argument(
        "--bypass-inbound", action="store_true", help="no inbound redirect (chains stay)"
    )
    parser.add_argument(
        "--virtual-interfaces",
        type=_interfaces,
        default=(),
        metavar="A,B",
        help="interfaces whose inbound TCP is treated as outbound",
    )


def _uid(text: str) -> int:
    try:
        uid = int(text)
    except ValueError:
        uid = -1
    if not 0 <= uid <= MAX_UID:
        raise argparse.ArgumentTypeError(f"not a user id (0 to {MAX_UID}): {text!r}")
    return uid


def _host_options(parser: argparse.ArgumentParser, *, uid_required: bool = True) -> None:
    parser.add_argument("--kubelet-uid", type=_uid, required=uid_required, metavar="N")
    parser.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True)


def _netns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--netns", required=True, metavar="PATH", help="network namespace path")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ztunnel-redirect",
        description="nftables-native traffic redirection for Istio ambient mode: "
        "the node agent and the operator tools around it.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    render = commands.add_parser("render", help="print a ruleset as an nft script").add_subparsers(
        dest="target", required=True, parser_class=_Parser
    )
    _pod_options(render.add_parser("pod", help="the in-pod ruleset"))
    _host_options(render.add_parser("host", help="the host probe-SNAT ruleset"))

    pod = commands.add_parser("pod", help="a pod's redirection in its netns").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    for action, text in (
        ("apply", "install rules and routing (idempotent)"),
        ("check", "exit 0 when in place, 1 with what drifted"),
        ("remove", "delete what we own"),
    ):
        sub = pod.add_parser(action, help=text)
        _netns(sub)
        _pod_options(sub)

    host = commands.add_parser("host", help="the host probe-SNAT rules").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    for action in ("apply", "check", "remove"):
        sub = host.add_parser(action)
        _netns(sub)
        _host_options(sub, uid_required=action != "remove")
    for action in ("add-pod", "remove-pod"):
        sub = host.add_parser(action, help=f"{action.split('-')[0]} a pod's IPs in the host sets")
        _netns(sub)
        sub.add_argument("--pod-uid", required=True)
        sub.add_argument("--pod-ip", action="append", required=True, metavar="IP")
        sub.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True)

    clean = commands.add_parser(
        "cleanup",
        help="remove everything ztunnel-redirect owns from this node (uninstall)",
        description="Remove our tables and routing from every pod netns found, the host table "
        "and the CNI plugin. Safe to run twice. Not for upgrades: rules stay during a restart.",
    )
    clean.add_argument("--host-netns", default=constants.HOST_NETNS, metavar="PATH")
    clean.add_argument("--proc-root", default=constants.PROC_ROOT, metavar="PATH")
    clean.add_argument(
        "--netns-dir", action="append", metavar="DIR", help="bound netns directory (repeatable)"
    )
    clean.add_argument("--cni-bin-dir", default=constants.CNI_BIN_DIR, metavar="DIR")
    clean.add_argument("--cni-conf-dir", default=constants.CNI_CONF_DIR, metavar="DIR")
    clean.add_argument(
        "--istio-owned-cni-conf-filename",
        default=constants.CNI_OWNED_CONF_NAME,
        metavar="FILE",
        help="the agent's own copy of the primary config, removed if it holds our entry",
    )
    clean.add_argument(
        "--run-dir",
        default=constants.CNI_AGENT_RUN_DIR,
        metavar="DIR",
        help="the agent's run dir, whose CNI decision file is removed",
    )
    clean.add_argument("--cni", action=argparse.BooleanOptionalAction, default=True)

    agent_parser = commands.add_parser(
        "agent",
        help="run the node agent",
        description="Run the node agent. Each flag defaults to its environment variable.",
    )
    settings.add_arguments(agent_parser)
    return parser


def _pod_options_from(args: argparse.Namespace) -> PodOptions:
    return PodOptions(
        ipv6=args.ipv6,
        dns_capture=args.dns_capture,
        bypass_inbound=args.bypass_inbound,
        virtual_interfaces=args.virtual_interfaces,
    )


def _report(drifts: list[Drift], *, verb: str) -> int:
    for drift in drifts:
        print(f"{verb}: {drift}")
    return EXIT_DRIFT if drifts and verb == "drift" else EXIT_OK


async def _pod(args: argparse.Namespace, runner: NetnsRunner) -> int:
    rules = PodRules(runner)
    if args.action == "remove":
        for item in await rules.remove(args.netns):
            print(f"removed: {item}")
        return EXIT_OK
    options = _pod_options_from(args)
    if args.action == "check":
        return _report(await rules.check(args.netns, options), verb="drift")
    return _report(await rules.apply(args.netns, options), verb="repaired")


async def _host(args: argparse.Namespace, runner: NetnsRunner) -> int:
    rules = HostRules(runner, netns=args.netns)
    if args.action == "remove":
        print("removed: host table" if await rules.remove() else "nothing to remove")
        return EXIT_OK
    if args.action == "add-pod":
        await rules.add_pod(args.pod_ip, PodUid(args.pod_uid), ipv6=args.ipv6)
        return EXIT_OK
    if args.action == "remove-pod":
        for ip in await rules.remove_pod(args.pod_ip, PodUid(args.pod_uid)):
            print(f"removed: {ip}")
        return EXIT_OK
    options = HostOptions(kubelet_uid=args.kubelet_uid, ipv6=args.ipv6)
    if args.action == "check":
        return _report(await rules.check(options), verb="drift")
    return _report(await rules.apply(options), verb="repaired")


def _in_kernel(
    command: Callable[[argparse.Namespace, NetnsRunner], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
) -> int:
    if not Path(args.netns).exists():
        raise NetnsNotFoundError(f"network namespace {args.netns} does not exist")

    async def run() -> int:
        with NetnsRunner(workers=1) as runner:
            await runner.run(None, probe)
            return await command(args, runner)

    return asyncio.run(run())


async def _cleanup(args: argparse.Namespace) -> int:
    installer = (
        CniInstaller(
            bin_dir=args.cni_bin_dir,
            conf_dir=args.cni_conf_dir,
            owned_conf_name=args.istio_owned_cni_conf_filename,
        )
        if args.cni
        else None
    )
    with NetnsRunner(workers=2) as runner:
        await runner.run(None, probe)
        report = await cleanup(
            runner,
            host_netns=args.host_netns,
            proc_root=args.proc_root,
            netns_dirs=args.netns_dir or constants.NETNS_DIRS,
            installer=installer,
            run_files=[
                Path(args.run_dir) / name
                for name in (
                    constants.DECISION_FILE,
                    constants.PLUGIN_LOG_SOCKET,
                    constants.PLUGIN_EVENT_SOCKET,
                )
                if args.cni
            ],
        )
    for line in report.lines():
        print(line)
    return EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    config = settings.from_args(args)
    logs.configure(fmt=config.log_format, level=config.log_level)
    asyncio.run(agent.run(config))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "agent":
        # Operator commands print their results on stdout; library events go to stderr.
        logs.configure(fmt="console", level="warning")
    try:
        if args.command == "render":
            if args.target == "pod":
                print(pod_ruleset(_pod_options_from(args)).script(), end="")
            else:
                options = HostOptions(kubelet_uid=args.kubelet_uid, ipv6=args.ipv6)
                print(host_ruleset(options).script(), end="")
            return EXIT_OK
        if args.command == "agent":
            return _agent(args)
        if args.command == "cleanup":
            return asyncio.run(_cleanup(args))
        if args.command == "pod":
            return _in_kernel(_pod, args)
        return _in_kernel(_host, args)
    except (ConfigError, RedirectError) as exc:
        print(f"ztunnel-redirect: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

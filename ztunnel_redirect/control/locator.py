"""Finding a running pod's netns: the /proc scan, shared by the pods that look at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from ztunnel_redirect.core.model import Pod, PodUid
from ztunnel_redirect.kernel import procscan
from ztunnel_redirect.kernel.netns import netns_id

__all__ = ["ProcLocator"]


def _nobody_else() -> Mapping[PodUid, Collection[str]]:
    return {}


class ProcLocator:
    """Finds a running pod's netns with the /proc scan (docs/design.md, finding a pod's
    netns), off the event loop. Implements `ports.NetnsLocator`.

    A scan reads every process of the node. Labelling a namespace enrolls all its running pods
    at once, and one scan per pod made that O(pods x processes). So one scan looks for every pod
    that `candidates` names (to be enrolled, netns not known yet), one at a time, and keeps what
    it found for the others. A kept match is used once, and only while it is still the same
    process (start time and netns inode unchanged: a pid reused by another process is never
    taken for the pod's).
    """

    def __init__(
        self,
        *,
        finder: procscan.NetnsFinder,
        candidates: Callable[[], Mapping[PodUid, Collection[str]]] = _nobody_else,
    ) -> None:
        self._finder = finder
        self._candidates = candidates
        self._found: dict[PodUid, procscan.NetnsMatch] = {}
        self._scanning = asyncio.Lock()

    async def locate(self, pod: Pod) -> str | None:
        async with self._scanning:
            match = self._found.pop(pod.uid, None)
            if match is not None and await asyncio.to_thread(_same_process, match):
                return match.path
            wanted = {**self._candidates(), pod.uid: pod.ips}
            found = await asyncio.to_thread(self._finder.find_all, wanted)
            match = found.pop(pod.uid, None)
            self._found = found
        return None if match is None else match.path

    async def find_all(self, pods: Collection[Pod]) -> dict[PodUid, str]:
        """The netns paths of `pods`, by one scan (start-up: pods a previous run enrolled)."""
        found = await asyncio.to_thread(self._finder.find_all, {p.uid: p.ips for p in pods})
        return {uid: match.path for uid, match in found.items()}


def _same_process(match: procscan.NetnsMatch) -> bool:
    """Whether the process a scan found is still there, unchanged (same start time, same netns)."""
    key = netns_id(match.path)
    try:
        stat = (Path(match.path).parent.parent / "stat").read_text()
    except OSError:
        return False
    return (
        key is not None
        and key[1] == match.inode
        and procscan.parse_start_time(stat) == match.start_time
    )

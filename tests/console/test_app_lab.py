"""The console's logic against a real 2-node lab: monitor, deploy, feeds, failover, loss.

Everything is real: the lab's sshd reached through its ProxyCommand relay,
host keys from its known_hosts, rampartd on each node, `rampart module
install` / `rampart start`, and the `rampart watch --json` feed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app import site as sitemod
from app.deploy import Deployment
from app.designer import DesignerModel
from app.feeds import LiveFeed
from app.logs import LogFilter, LogModel
from app.nodes import NodeService, NodeStatus, SiteModel
from app.ssh import Backoff
from app.timeline import Timeline
from app.workers import Workers
from tests.node.conftest import lab_running, rampart

pytestmark = pytest.mark.node

WAIT_S = 60.0


@pytest.fixture(scope="module")
def lab() -> Iterator[dict]:
    with lab_running(2) as status:
        yield status


class Watcher:
    """Waits (bounded) for a condition over the site model's statuses."""

    def __init__(self, model: SiteModel) -> None:
        self.model = model
        self._changed = threading.Condition()
        model.status_changed.connect(self._on_status)

    def _on_status(self, node: str, status: NodeStatus) -> None:
        with self._changed:
            self._changed.notify_all()

    def until(self, what: Callable[[dict[str, NodeStatus]], bool], timeout: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: what(self.model.statuses()), timeout)


def states(statuses: dict[str, NodeStatus]) -> list[str]:
    return sorted(str(s.states.get("web", {}).get("state")) for s in statuses.values())


def test_deploy_watch_and_lose_a_node(lab: dict, tmp_path: Path) -> None:
    site = sitemod.load(lab["site_file"])
    n1, n2 = site.node_names
    workers = Workers("rt-lab")
    model = SiteModel(site, workers=workers, backoff=Backoff(0.2, 2, 1.0), idle_timeout=3.0)
    feed, timeline, logs = LiveFeed(), Timeline(), LogModel()
    for sink in (feed.add_line, timeline.add_line, logs.add_line):
        model.feed_line.connect(sink)
    watcher = Watcher(model)
    try:
        model.start_monitoring()
        assert watcher.until(lambda s: all(x.reachable and x.version for x in s.values())), (
            model.statuses()
        )
        assert model.status(n1).role == "admin"

        designer = DesignerModel.from_template("mirror")
        designer.set_field(("module", "name"), "web")
        designer.set_field(("node", 0, "name"), n1)
        designer.set_field(("node", 1, "name"), n2)
        designer.build(
            tmp_path / "web", site.resolve(site.signing_key or ""), tmp_path / "web.safe"
        )
        deployment = Deployment(site, tmp_path / "web.safe", [n1, n2], workers=workers)
        assert deployment.check() == "web 1: valid, signature checked"
        deployment.run()
        assert deployment.wait(WAIT_S)
        for node in (n1, n2):
            assert deployment.progress(node).ok, deployment.progress(node).summary

        # The watch feeds report the pair settling as PRIM + SECOND.
        assert watcher.until(lambda s: states(s) == ["PRIM", "SECOND"]), model.statuses()
        prim = next(n for n, s in model.statuses().items() if s.states["web"]["state"] == "PRIM")
        assert {n for n, _ in timeline.rows("web").items()} == {n1, n2}
        assert timeline.rows("web")[prim][-1].state == "PRIM"
        assert any(m.kind == "transition" for m in timeline.markers("web"))
        assert logs.filtered(LogFilter(modules=frozenset({"web"}), text="PRIM"))
        assert feed.state(prim, "web") == "PRIM"

        # An action through the node service, refused or done with the node's reason.
        service = NodeService(site, site.node(prim))
        try:
            result = service.action("web", "prim")
        finally:
            service.close()
        assert result.reason

        # Losing a node shows it unreachable; healing it brings it back.
        rampart("lab", "cut", "--name", lab["name"], n2)
        try:
            assert watcher.until(lambda s: s[n2].reachable is False), model.status(n2)
            assert "node " + n2 in (model.status(n2).error or "")
        finally:
            rampart("lab", "heal", "--name", lab["name"], n2)
        assert watcher.until(lambda s: bool(s[n2].reachable) and s[n2].error is None)
    finally:
        model.close()
        assert workers.shutdown(15) == []

"""The console's objects for one site, wired together (no widgets here).

One ``Console`` owns the workers and the models every window shows: the
site model (one monitor thread per node), and the live feed, timeline and
logs, which all take the same watch lines the site model receives. Closing
it stops the monitors and joins every thread it started.
"""

from __future__ import annotations

import logging
from typing import Any

from app.credentials import Credentials
from app.designer import DesignerModel
from app.feeds import LiveFeed
from app.logs import LogModel
from app.nodes import SiteModel
from app.site import Site
from app.timeline import Timeline
from app.workers import Workers
from node_service.module.model import MIRROR, Module, Node, Replication

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 3.0


def starter_module(site: Site) -> Module:
    """A new mirror module on the site's first two nodes: the designer's blank page."""
    nodes = tuple(Node(n.name, n.addresses) for n in site.nodes[:2])
    return Module(name="newmodule", kind=MIRROR, nodes=nodes, replication=Replication(dirs=()))


class Console:
    """Workers and models of one open site."""

    def __init__(
        self, site: Site, creds: Credentials | None = None, workers: Workers | None = None
    ) -> None:
        self.site = site
        self.creds = creds or Credentials()
        self.workers = workers or Workers("console")
        self.site_model = SiteModel(site, self.creds, self.workers)
        self.feed = LiveFeed()
        self.timeline = Timeline()
        self.logs = LogModel()
        self.designer = DesignerModel(starter_module(site))
        self.site_model.feed_line.connect(self.take_line)
        self._closed = False

    def take_line(self, node: str, line: dict[str, Any]) -> None:
        """One watch line from a node, for every model that draws it (any thread)."""
        self.feed.add_line(node, line)
        self.timeline.add_line(node, line)
        self.logs.add_line(node, line)

    @property
    def signing_key(self) -> str | None:
        return str(self.site.resolve(self.site.signing_key)) if self.site.signing_key else None

    @property
    def trust_pub(self) -> str | None:
        return str(self.site.resolve(self.site.trust_pub)) if self.site.trust_pub else None

    def start(self) -> None:
        self.site_model.start_monitoring()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> list[str]:
        """Stop monitoring and join the workers; names of threads that did not stop."""
        if self._closed:
            return []
        self._closed = True
        self.site_model.feed_line.disconnect(self.take_line)
        self.site_model.stop_monitoring(timeout)
        for service in self.site_model.services.values():
            service.close()
        left = self.workers.shutdown(timeout)
        if left:
            log.warning("threads still running at exit: %s", ", ".join(left))
        return left

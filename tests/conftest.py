"""Shared fixtures. The zeroconf guard is autouse: no test may start zeroconf in the host's
network namespace."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from support.netns import netns_lan
from support.nodejs import node_js
from support.noderelay import relay
from support.zeroconf_guard import zeroconf_guard

__all__ = ["netns_lan", "node_js", "relay", "zeroconf_guard"]

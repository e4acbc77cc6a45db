"""
The balancer's state file: what operators set (drain, disable, weight, the
policy) survives a balancer restart.

A small JSON document the balancer owns, rewritten atomically (write a
temporary file, fsync, rename) after every admin change and read at start.
Backends listed there appear as down until they register again.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict

from twisted.logger import Logger

from twistedcluster.cluster import Cluster
from twistedcluster.policies import POLICIES
from twistedcluster.pool import AdminState, MAX_WEIGHT, MIN_WEIGHT

log = Logger()

VERSION = 1


class StateFileError(ValueError):
    """
    The state file exists but cannot be used; the message says why.
    """


def snapshot(cluster: Cluster) -> Dict[str, Any]:
    return {
        "version": VERSION,
        "policy": cluster.policyName,
        "backends": cluster.pool.adminSettings(),
    }


def save(path: str, cluster: Cluster) -> None:
    """
    Write the state atomically: a crash leaves the old file or the new one.
    """
    data = json.dumps(snapshot(cluster), indent=2, sort_keys=True).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str) -> Dict[str, Any]:
    """
    Read and check a state file; an empty state if there is none yet.
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"version": VERSION, "policy": None, "backends": {}}
    except (OSError, ValueError) as e:
        raise StateFileError(f"cannot read state file {path}: {e}") from None
    try:
        if data["version"] != VERSION:
            raise StateFileError(f"state file {path}: unknown version {data['version']!r}")
        policy = data.get("policy")
        if policy is not None and policy not in POLICIES:
            raise StateFileError(f"state file {path}: unknown policy {policy!r}")
        for name, b in data["backends"].items():
            AdminState(b["admin"])
            if not (MIN_WEIGHT <= int(b["weight"]) <= MAX_WEIGHT):
                raise ValueError(f"weight {b['weight']}")
            str(b["host"])
            int(b["port"])
    except StateFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateFileError(f"state file {path} is malformed: {e!r}") from None
    return data


def restore(cluster: Cluster, data: Dict[str, Any]) -> None:
    if data.get("policy"):
        cluster.setPolicy(data["policy"])
    for name, b in data["backends"].items():
        cluster.pool.restore(
            name, str(b["host"]), int(b["port"]), AdminState(b["admin"]), int(b["weight"])
        )


class StateKeeper:
    """
    Saves the cluster's admin state to C{path} whenever it is told of a
    change.  A failed write is logged, never fatal: routing goes on.
    """

    def __init__(self, path: str, cluster: Cluster) -> None:
        self.path = path
        self.cluster = cluster

    def __call__(self) -> None:
        try:
            save(self.path, self.cluster)
        except OSError as e:
            log.error(
                "cannot write state file {path}: {error}; admin changes will "
                "not survive a restart",
                path=self.path,
                error=e,
            )

"""Drive one OpenStack client against blocksnapd and print what it answered.

tests/openstack_clients.rs runs this with the Python of the virtualenv that
holds the client (scripts/install-clients.sh), one operation per run:

    python drive.py CLIENT OPERATION [ARG ...]

CLIENT is one of
    cinder-cli      python-cinderclient 9.x, the `cinder` command
    cinder-api      python-cinderclient 9.x, its Python API
    cinder-api-unix the same on the Unix socket itself (requests-unixsocket)
    sdk             openstacksdk 4.x, conn.block_storage
    osc             python-openstackclient, the `openstack` command
    cinder-v1       python-cinderclient 4.3, `cinder --os-volume-api-version 1`

and the environment gives the endpoint:
    BLOCKSNAP_URL      e.g. http://127.0.0.1:PORT/v3/PROJECT (v1 for cinder-v1)
    BLOCKSNAP_TOKEN    the X-Auth-Token
    BLOCKSNAP_PROJECT  the project (tenant) id
    BLOCKSNAP_VOLUME_API_VERSION  optional: a microversion such as 3.40
                       (default: whatever the client negotiates)

It prints one JSON document on stdout: the object or list the client gave
back, reduced to the fields every client knows (id, name, description,
status, size, volume_id, snapshot_id, metadata), so the Rust test can compare
clients with one another. A failing client command exits non-zero with its
output on stderr. The test, not this script, decides what is right.
"""

import ast
import json
import os
import subprocess
import sys

URL = os.environ["BLOCKSNAP_URL"]
TOKEN = os.environ["BLOCKSNAP_TOKEN"]
PROJECT = os.environ["BLOCKSNAP_PROJECT"]
MICROVERSION = os.environ.get("BLOCKSNAP_VOLUME_API_VERSION") or None
BIN = os.path.dirname(sys.executable)


def fail(msg):
    sys.stderr.write(msg.rstrip() + "\n")
    sys.exit(1)


def clean_env():
    """The clients read OS_* variables: none may leak in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def reduce(obj):
    """The fields every client knows, from a dict or a resource object."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj._info)
    out = {}
    for k in ("id", "status", "size", "volume_id", "snapshot_id", "metadata",
              "user_id", "updated_at", "created_at", "is_incremental",
              "has_dependent_backups", "backup_id", "volume_name"):
        if k in obj:
            out[k] = obj[k]
    out["name"] = obj.get("name", obj.get("display_name"))
    out["description"] = obj.get("description", obj.get("display_description"))
    for k, v in obj.items():
        if k.startswith("os-extended-snapshot-attributes:"):
            out[k] = v
    return out


def parse_kv(args):
    return dict(a.split("=", 1) for a in args)


# ---------------------------------------------------------------- CLI tables

def run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        fail("%s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    return p.stdout


def table_rows(text):
    """Rows of a prettytable as lists of cells."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            rows.append([c.strip() for c in line[1:-1].split("|")])
    return rows


def property_table(text):
    """`| Property | Value |` tables as a dict; a value split over several
    lines (long metadata) is joined."""
    rows = table_rows(text)
    out, last = {}, None
    for r in rows[1:]:
        if len(r) != 2:
            continue
        if r[0]:
            last = r[0]
            out[last] = r[1]
        elif last is not None:
            out[last] += r[1]
    return out


def list_table(text):
    rows = table_rows(text)
    if not rows:
        return []
    head = rows[0]
    return [dict(zip(head, r)) for r in rows[1:]]


def cli_value(v):
    """Values in cinder's tables: None, dicts and lists (JSON or Python)."""
    if v == "None":
        return None
    if v.startswith("{") or v.startswith("["):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            try:
                return json.loads(v)
            except ValueError:
                return v
    return v


def numbers(d):
    """Sizes are numbers in JSON; tables print them as text."""
    if isinstance(d.get("size"), str) and d["size"].isdigit():
        d["size"] = int(d["size"])
    return d


class CinderCli:
    """The `cinder` command, 9.x (v3) or 4.3 (v1)."""

    def __init__(self, legacy):
        self.legacy = legacy

    def cmd(self, *args):
        env = clean_env()
        base = [os.path.join(BIN, "cinder"), "--os-auth-type", "admin_token",
                "--os-endpoint", URL, "--os-project-id", PROJECT]
        if self.legacy:
            base[1:1] = ["--os-volume-api-version", "1"]
            base += ["--os-token", TOKEN]
        else:
            # cinderclient 9 takes the token only from the environment.
            env["OS_TOKEN"] = TOKEN
            if MICROVERSION:
                base[1:1] = ["--os-volume-api-version", MICROVERSION]
        return run(base + list(args), env)

    def table(self, *args):
        """A two-column table as it is (metadata-show and the like)."""
        return {k: cli_value(v) for k, v in property_table(self.cmd(*args)).items()}

    def props(self, *args):
        p = self.table(*args)
        if "display_name" in p and "name" not in p:
            p["name"] = p["display_name"]
        if "display_description" in p and "description" not in p:
            p["description"] = p["display_description"]
        return reduce(numbers(p))

    def rows(self, *args):
        out = []
        for r in list_table(self.cmd(*args)):
            r = {k.lower().replace(" ", "_"): cli_value(v) for k, v in r.items()}
            out.append(reduce(numbers(r)))
        return out

    def name_opts(self, name, desc):
        o = []
        if name is not None:
            o += ["--display-name" if self.legacy else "--name", name]
        if desc is not None:
            o += ["--display-description" if self.legacy else "--description", desc]
        return o

    # backups (cinder 9)
    def backup_create(self, vid, name, incremental):
        incr = ["--incremental"] if incremental == "true" else []
        return self.props("backup-create", "--name", name, *incr, vid)

    def backups(self):
        return self.rows("backup-list")

    def backup(self, bid):
        return self.props("backup-show", bid)

    def backup_delete(self, bid):
        self.cmd("backup-delete", bid)

    def backups_page(self, limit, sort):
        return self.rows("backup-list", "--limit", limit, "--sort", sort)

    def create_volume_from_backup(self, bid, name):
        # --backup-id exists from 3.47 (BLOCKSNAP_VOLUME_API_VERSION).
        return self.props("create", "--backup-id", bid, "--name", name)

    # volumes
    def volumes(self):
        return self.rows("list")

    def volume(self, vid):
        return self.props("show", vid)

    def create_volume(self, snap, name):
        size = [] if not self.legacy else ["1"]
        # 4.3 wants a size even from a snapshot; 1 GB is the snapshot's.
        return self.props("create", "--snapshot-id", snap, *self.name_opts(name, None), *size)

    def delete_volume(self, vid):
        self.cmd("delete", vid)

    def volume_metadata(self, vid, action, *kv):
        if action == "show":
            return self.table("metadata-show", vid)
        self.cmd("metadata", vid, action, *kv)
        return None

    def revert(self, vid, snap):
        self.cmd("revert-to-snapshot", snap)

    # snapshots
    def snapshots(self):
        return self.rows("snapshot-list")

    def snapshot(self, sid):
        return self.props("snapshot-show", sid)

    def create_snapshot(self, vid, name, desc, meta):
        args = ["snapshot-create", *self.name_opts(name, desc)]
        if meta and not self.legacy:
            args += ["--metadata", *["%s=%s" % kv for kv in meta.items()]]
        return self.props(*args, vid)

    def rename_snapshot(self, sid, name, desc):
        o = []
        if desc is not None:
            o = ["--display-description" if self.legacy else "--description", desc]
        self.cmd("snapshot-rename", *o, sid, name)

    def delete_snapshot(self, sid):
        self.cmd("snapshot-delete", sid)

    def snapshot_metadata(self, sid, action, *kv):
        if action == "show":
            return self.table("snapshot-metadata-show", sid)
        if action == "replace":
            self.cmd("snapshot-metadata-update-all", sid, *kv)
            return None
        self.cmd("snapshot-metadata", sid, action, *kv)
        return None


# ---------------------------------------------------------------- Python APIs

class CinderApi:
    """python-cinderclient 9.x as a library, over a keystoneauth session.
    With `unix`, BLOCKSNAP_URL is an http+unix:// URL (the socket's path
    percent-encoded as the host) and requests-unixsocket carries the
    requests: no TCP at all."""

    def __init__(self, unix=False):
        from cinderclient import api_versions, client
        from keystoneauth1 import session, token_endpoint

        sess = session.Session(auth=token_endpoint.Token(URL, TOKEN))
        endpoint = URL
        if unix:
            import requests_unixsocket

            sess.session.mount("http+unix://", requests_unixsocket.UnixAdapter())
            # keystoneauth %-formats endpoint_override (for %(project_id)s).
            endpoint = URL.replace("%", "%%")
        if MICROVERSION:
            version = api_versions.APIVersion(MICROVERSION)
        elif unix:
            # cinderclient's discovery does not %-format the endpoint it
            # reads `GET /` from, so read the versions document here.
            root = URL.split("/v3/")[0] + "/"
            doc = sess.get(root, authenticated=False, raise_exc=False).json()
            v3 = [v for v in doc["versions"] if v["id"] == "v3.0"][0]
            version = api_versions.APIVersion(v3["version"])
        else:
            probe = client.Client("3.0", session=sess, endpoint_override=endpoint)
            version = api_versions.discover_version(
                probe, api_versions.APIVersion(api_versions.MAX_VERSION))
        self.c = client.Client(version.get_string(), session=sess, endpoint_override=endpoint)

    def backup_create(self, vid, name, incremental):
        return reduce(self.c.backups.create(vid, name=name, incremental=incremental == "true"))

    def backups(self):
        return [reduce(b) for b in self.c.backups.list()]

    def backup(self, bid):
        return reduce(self.c.backups.get(bid))

    def backup_restore(self, bid, name):
        return reduce(self.c.restores.restore(bid, name=name))

    def backup_delete(self, bid):
        self.c.backups.delete(bid)

    def backups_page(self, limit, sort):
        return [reduce(b) for b in self.c.backups.list(limit=int(limit), sort=sort)]

    def create_volume_from_backup(self, bid, name):
        return reduce(self.c.volumes.create(None, backup_id=bid, name=name))

    def volumes(self):
        return [reduce(v) for v in self.c.volumes.list()]

    def volume(self, vid):
        return reduce(self.c.volumes.get(vid))

    def create_volume(self, snap, name):
        return reduce(self.c.volumes.create(size=None, snapshot_id=snap, name=name))

    def delete_volume(self, vid):
        self.c.volumes.delete(vid)

    def volume_metadata(self, vid, action, *kv):
        if action == "show":
            return self.c.volumes.get(vid).metadata
        if action == "set":
            self.c.volumes.set_metadata(vid, parse_kv(kv))
            return None
        if action == "unset":
            self.c.volumes.delete_metadata(vid, list(kv))
            return None
        fail("no volume metadata action %s" % action)

    def revert(self, vid, snap):
        self.c.volumes.revert_to_snapshot(self.c.volumes.get(vid), self.c.volume_snapshots.get(snap))

    def snapshots(self):
        return [reduce(s) for s in self.c.volume_snapshots.list()]

    def snapshot(self, sid):
        return reduce(self.c.volume_snapshots.get(sid))

    def create_snapshot(self, vid, name, desc, meta):
        return reduce(self.c.volume_snapshots.create(vid, name=name, description=desc, metadata=meta))

    def rename_snapshot(self, sid, name, desc):
        kw = {"name": name}
        if desc is not None:
            kw["description"] = desc
        self.c.volume_snapshots.update(sid, **kw)

    def delete_snapshot(self, sid):
        self.c.volume_snapshots.delete(sid)

    def snapshot_metadata(self, sid, action, *kv):
        s = self.c.volume_snapshots
        if action == "show":
            return s.get(sid).metadata
        if action == "set":
            s.set_metadata(sid, parse_kv(kv))
            return None
        if action == "unset":
            s.delete_metadata(sid, list(kv))
            return None
        if action == "replace":
            s.update_all_metadata(sid, parse_kv(kv))
            return None
        fail("no snapshot metadata action %s" % action)


class Sdk:
    """openstacksdk's block_storage proxy."""

    def __init__(self):
        import openstack

        self.conn = openstack.connection.Connection(
            auth_type="admin_token",
            auth={"endpoint": URL, "token": TOKEN},
            block_storage_endpoint_override=URL,
            block_storage_api_version="3",
        )
        self.bs = self.conn.block_storage

    def volumes(self):
        return [reduce(v) for v in self.bs.volumes(details=True)]

    def volume(self, vid):
        return reduce(self.bs.get_volume(vid))

    def create_volume(self, snap, name):
        return reduce(self.bs.create_volume(snapshot_id=snap, name=name))

    def delete_volume(self, vid):
        self.bs.delete_volume(vid, ignore_missing=False)

    def snapshots(self):
        return [reduce(s) for s in self.bs.snapshots(details=True)]

    def snapshot(self, sid):
        return reduce(self.bs.get_snapshot(sid))

    def create_snapshot(self, vid, name, desc, meta):
        return reduce(self.bs.create_snapshot(volume_id=vid, name=name, description=desc,
                                              metadata=meta or {}))

    def delete_snapshot(self, sid):
        self.bs.delete_snapshot(sid, ignore_missing=False)

    def rename_snapshot(self, sid, name, desc):
        kw = {"name": name}
        if desc is not None:
            kw["description"] = desc
        self.bs.update_snapshot(sid, **kw)

    def snapshot_metadata(self, sid, action, *kv):
        s = self.bs.get_snapshot(sid)
        if action == "show":
            return self.bs.get_snapshot_metadata(s).metadata
        if action == "set":
            return self.bs.set_snapshot_metadata(s, **parse_kv(kv)).metadata
        if action == "unset":
            self.bs.delete_snapshot_metadata(s, list(kv))
            return None
        fail("no snapshot metadata action %s" % action)


class Osc:
    """The `openstack` command."""

    def cmd(self, *args, fmt=True):
        base = [os.path.join(BIN, "openstack"), "--os-auth-type", "admin_token",
                "--os-token", TOKEN, "--os-endpoint", URL,
                "--os-volume-api-version", MICROVERSION or "3"]
        out = run(base + list(args) + (["-f", "json"] if fmt else []), clean_env())
        return json.loads(out) if fmt else None

    @staticmethod
    def norm(d):
        d = {k.lower().replace(" ", "_"): v for k, v in d.items()}
        if "properties" in d and "metadata" not in d:
            d["metadata"] = d.pop("properties")
        if "volume" in d and "volume_id" not in d:
            d["volume_id"] = d.pop("volume")
        return reduce(d)

    def volumes(self):
        return [self.norm(v) for v in self.cmd("volume", "list")]

    def volume(self, vid):
        return self.norm(self.cmd("volume", "show", vid))

    def snapshots(self):
        return [self.norm(s) for s in self.cmd("volume", "snapshot", "list", "--long")]

    def snapshot(self, sid):
        return self.norm(self.cmd("volume", "snapshot", "show", sid))

    def create_snapshot(self, vid, name, desc, meta):
        args = ["volume", "snapshot", "create", "--volume", vid]
        if desc is not None:
            args += ["--description", desc]
        for k, v in (meta or {}).items():
            args += ["--property", "%s=%s" % (k, v)]
        return self.norm(self.cmd(*args, name))

    def delete_snapshot(self, sid):
        self.cmd("volume", "snapshot", "delete", sid, fmt=False)


CLIENTS = {
    "cinder-cli": lambda: CinderCli(legacy=False),
    "cinder-v1": lambda: CinderCli(legacy=True),
    "cinder-api": CinderApi,
    "cinder-api-unix": lambda: CinderApi(unix=True),
    "sdk": Sdk,
    "osc": Osc,
}


def main(argv):
    if len(argv) < 3 or argv[1] not in CLIENTS:
        fail(__doc__)
    client = CLIENTS[argv[1]]()
    op, args = argv[2], argv[3:]
    fn = getattr(client, op.replace("-", "_"), None)
    if fn is None:
        fail("%s cannot %s" % (argv[1], op))
    if op == "create-snapshot":
        # VOLUME NAME DESCRIPTION [key=value ...]
        result = fn(args[0], args[1], args[2], parse_kv(args[3:]))
    elif op == "rename-snapshot":
        # SNAPSHOT NAME [DESCRIPTION]
        result = fn(args[0], args[1], args[2] if len(args) > 2 else None)
    else:
        result = fn(*args)
    json.dump(result, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)

#!/usr/bin/env python3
"""A gopush-cluster client written from gopush-cluster's protocol documents
only (standard library, nothing from this repository), to show that existing
gopush clients work against pushcluster unchanged.

    gopush_client.py PUBLIC_URL ADMIN_URL KEY COUNT

It asks web for the key's TCP comet (/1/server/get?k=&p=2), subscribes with
the RESP command `sub KEY HEARTBEAT` (legacy message format), pushes COUNT
messages through /1/admin/push/private, reads them as RESP bulk strings,
checks the `+h` heartbeat exchange, then fetches them again with the v1 and
legacy offline endpoints. Prints one JSON line per check; exits 1 on failure.
"""
import json
import socket
import sys
import urllib.request


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post(url, body):
    req = urllib.request.Request(url, data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def read_line(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise SystemExit("connection closed: %r" % line)
    return line[:-2]


def main():
    public, admin, key, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    server = get("%s/1/server/get?k=%s&p=2" % (public, key))
    assert server["ret"] == 0, server
    host, port = server["data"]["server"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    f = sock.makefile("rb")
    args = [b"sub", key.encode(), b"30"]
    cmd = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    sock.sendall(cmd)
    assert read_line(f) == b"+h", "no +h after sub"
    print(json.dumps({"check": "subscribed", "server": server["data"]["server"]}))
    pushed = []
    for i in range(count):
        r = post("%s/1/admin/push/private?key=%s&expire=60" % (admin, key), json.dumps({"n": i}))
        assert r["ret"] == 0, r
        pushed.append(i)
    got = []
    while len(got) < count:
        head = read_line(f)
        if head == b"+h":
            continue
        assert head.startswith(b"$"), head
        body = f.read(int(head[1:]) + 2)[:-2]
        m = json.loads(body)
        # Legacy format: msg is the message as a JSON string.
        assert isinstance(m["msg"], str), m
        got.append((m["mid"], json.loads(m["msg"])["n"], m["gid"]))
    assert [g[1] for g in got] == pushed, got
    assert [g[0] for g in got] == sorted(g[0] for g in got), "mids out of order"
    print(json.dumps({"check": "received", "messages": len(got)}))
    sock.sendall(b"h")
    assert read_line(f) == b"+h", "heartbeat not answered"
    print(json.dumps({"check": "heartbeat"}))
    first = got[0][0]
    v1 = get("%s/1/msg/get?k=%s&m=%d" % (public, key, first - 1))
    assert [m["mid"] for m in v1["data"]["msgs"]] == [g[0] for g in got], v1
    legacy = get("%s/msg/get?key=%s&mid=%d" % (public, key, first - 1))
    assert legacy["msg"] == "ok"
    assert [json.loads(s)["mid"] for s in legacy["data"]["msgs"]] == [g[0] for g in got], legacy
    print(json.dumps({"check": "offline", "v1": len(v1["data"]["msgs"]), "legacy": len(legacy["data"]["msgs"])}))
    sock.close()


if __name__ == "__main__":
    main()

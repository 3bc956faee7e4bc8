"""A Python player for examples/rpc/server.lua, over a plain socket with
python3-msgpack and no RPC library: MessagePack-RPC is just arrays.

    /usr/bin/python3 client.py [port] [uid] [peer_uid]

It logs in, then (with peer_uid) whispers to that player and prints the
answer; whispers addressed to it arrive as requests from the server
([0, msgid, "on_whisper", [from, text]]), which it answers.
"""
import socket
import sys

import msgpack

port = int(sys.argv[1]) if len(sys.argv) > 1 else 5700
uid = sys.argv[2] if len(sys.argv) > 2 else "py-player"
peer = sys.argv[3] if len(sys.argv) > 3 else uid

sock = socket.create_connection(("127.0.0.1", port))
unpacker = msgpack.Unpacker(raw=False)
next_id = 0


def messages():
    while True:
        for msg in unpacker:
            yield msg
        data = sock.recv(65536)
        if not data:
            return
        unpacker.feed(data)


incoming = messages()


def call(method, *params):
    """Send a request and wait for its response, answering the server's
    own requests meanwhile."""
    global next_id
    next_id += 1
    msgid = next_id
    sock.sendall(msgpack.packb([0, msgid, method, list(params)]))
    for msg in incoming:
        if msg[0] == 0:  # the server calls us
            _, sid, name, args = msg
            if name == "on_whisper":
                sock.sendall(msgpack.packb([1, sid, None, "%s heard %s: %s" % (uid, args[0], args[1])]))
            else:
                sock.sendall(msgpack.packb([1, sid, "no such method: " + name, None]))
        elif msg[0] == 1 and msg[1] == msgid:
            _, _, error, result = msg
            if error is not None:
                raise RuntimeError(error)
            return result
    raise RuntimeError("the server closed the connection")


print(call("player.login", uid))
print(call("player.move", 1, 2))
print(call("chat.whisper", peer, "hi from Python"))
print("online: " + ", ".join(call("player.online")))
sock.close()

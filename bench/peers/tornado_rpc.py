"""A MessagePack-RPC server on Tornado with python3-msgpack, answering
sum(a, b), the way the Tornado TCP book writes one: each request is
handled in a coroutine of its own, answers written as they finish."""
import sys

import msgpack
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer

METHODS = {"sum": lambda a, b: a + b}


class RPC(TCPServer):
    async def handle_stream(self, stream, address):
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while True:
                unpacker.feed(await stream.read_bytes(65536, partial=True))
                for msg in unpacker:
                    if msg[0] == 0:
                        IOLoop.current().add_callback(self.serve, stream, msg)
        except StreamClosedError:
            pass

    async def serve(self, stream, msg):
        _, msgid, method, params = msg
        fn = METHODS.get(method)
        if fn is None:
            answer = [1, msgid, "no such method: " + method, None]
        else:
            answer = [1, msgid, None, fn(*params)]
        try:
            await stream.write(msgpack.packb(answer))
        except StreamClosedError:
            pass


RPC().listen(int(sys.argv[1]), "127.0.0.1")
IOLoop.current().start()

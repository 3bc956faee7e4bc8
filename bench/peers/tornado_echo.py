"""Tornado line echo: TCPServer + IOStream.read_until, the idiomatic way."""
import sys

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer


class Echo(TCPServer):
    async def handle_stream(self, stream, address):
        try:
            while True:
                line = await stream.read_until(b"\n")
                await stream.write(line)
        except StreamClosedError:
            pass


Echo().listen(int(sys.argv[1]), "127.0.0.1")
IOLoop.current().start()

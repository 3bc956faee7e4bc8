"""Tornado HTTP hello: a RequestHandler, the idiomatic way."""
import sys

from tornado.ioloop import IOLoop
from tornado.web import Application, RequestHandler


class Hello(RequestHandler):
    def get(self):
        self.set_header("Content-Type", "text/plain")
        self.write("Hello, world!\n")


Application([(r"/", Hello)]).listen(int(sys.argv[1]), "127.0.0.1")
IOLoop.current().start()

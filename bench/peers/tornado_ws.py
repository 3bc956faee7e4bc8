"""WebSocket echo on Tornado's websocket module, for make bench."""
import sys

import tornado.ioloop
import tornado.web
import tornado.websocket


class Echo(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message(message, binary=isinstance(message, bytes))

    def check_origin(self, origin):
        return True


app = tornado.web.Application([(r"/", Echo)])
app.listen(int(sys.argv[1]), "127.0.0.1")
tornado.ioloop.IOLoop.current().start()

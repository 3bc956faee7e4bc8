// Node HTTP hello.
const http = require("http");
http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": 14 });
  res.end("Hello, world!\n");
}).listen(+process.argv[2], "127.0.0.1");

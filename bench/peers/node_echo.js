// Node line echo: net server, lines split from 'data' events, one write
// per line (how a Node line protocol is usually written).
const net = require("net");
net.createServer((sock) => {
  let pending = "";
  sock.setEncoding("latin1");
  sock.on("data", (data) => {
    pending += data;
    let nl;
    while ((nl = pending.indexOf("\n")) >= 0) {
      sock.write(pending.slice(0, nl + 1), "latin1");
      pending = pending.slice(nl + 1);
    }
  });
  sock.on("error", () => {});
}).listen(+process.argv[2], "127.0.0.1");

// The page of `burrow launch shell`: xterm.js on a WebSocket to one shell.
// Messages are terminado's JSON arrays: ["stdin", text] and ["set_size", rows, cols]
// go out; ["stdout", text] comes in. The server closes with a reason when the
// shell ends or a message is refused; the status line shows it.
"use strict";
(() => {
  const status = document.getElementById("status");
  const setState = (state, text) => {
    document.body.dataset.state = state;
    status.textContent = text;
  };

  const term = new Terminal({ cursorBlink: true, scrollback: 10000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/ws`);
  const send = (message) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  };
  const sendSize = () => send(["set_size", term.rows, term.cols]);

  socket.addEventListener("open", () => {
    setState("connected", `connected to ${location.host}`);
    sendSize();
    term.focus();
  });
  socket.addEventListener("message", (event) => {
    const [type, data] = JSON.parse(event.data);
    if (type === "stdout") term.write(data);
  });
  socket.addEventListener("close", (event) => {
    const why = event.reason || (event.code === 1006 ? "connection lost" : `closed (${event.code})`);
    setState("ended", `${why}; reload the page for a new shell`);
    term.options.disableStdin = true;
  });

  term.onData((data) => send(["stdin", data]));
  term.onResize(sendSize);
  new ResizeObserver(() => fit.fit()).observe(document.getElementById("terminal"));
})();

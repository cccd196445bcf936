// The web console's page: a small line-oriented terminal on a <pre>, bridged to
// the server's WebSocket. Guest output arrives as binary frames (UTF-8, decoded
// across frame boundaries), control messages as JSON text frames; keys go out as
// binary frames. The terminal understands CR, LF (which also returns to column
// 0), backspace, tab and the escape sequences a shell's line editing uses
// (cursor left/right, erase in line, clear screen); colours and other
// sequences are dropped. Full-screen programs need a real terminal emulator.
"use strict";

const SCROLLBACK_LINES = 5000;
const SCREEN_ROWS = 24; // what "cursor to row N" counts from: the last 24 lines

class Screen {
  constructor(element) {
    this.element = element;
    this.lines = [""];
    this.row = 0;
    this.col = 0;
    this.state = "text"; // text, esc, esc-skip, csi, osc, osc-esc
    this.params = "";
    this.notices = [];
    this.scheduled = false;
  }

  write(text) {
    for (const ch of text) this.put(ch);
    this.schedule();
  }

  notice(text) {
    this.notices.push(text);
    this.schedule();
  }

  put(ch) {
    switch (this.state) {
      case "esc":
        if (ch === "[") { this.state = "csi"; this.params = ""; }
        else if (ch === "]") { this.state = "osc"; }
        else if ("()*+#%".includes(ch)) { this.state = "esc-skip"; } // e.g. ESC ( B: charsets
        else { this.state = "text"; if (ch === "c") this.clear(); }
        return;
      case "csi":
        if (ch >= "\x20" && ch <= "\x3f") { this.params += ch; }
        else { this.state = "text"; this.csi(ch, this.params); }
        return;
      case "osc": // operating system command (window title...): ends with BEL or ESC \
        if (ch === "\x07") this.state = "text";
        else if (ch === "\x1b") this.state = "osc-esc";
        return;
      case "esc-skip":
        this.state = "text";
        return;
      case "osc-esc":
        this.state = ch === "\\" ? "text" : "osc";
        return;
    }
    switch (ch) {
      case "\x1b": this.state = "esc"; return;
      case "\r": this.col = 0; return;
      case "\n": this.newline(); return;
      case "\b": this.col = Math.max(0, this.col - 1); return;
      case "\t": this.col = Math.min(this.col + 8 - (this.col % 8), 1 << 12); return;
    }
    if (ch < "\x20" || ch === "\x7f") return; // other control characters: ignored
    const chars = [...this.lines[this.row]];
    while (chars.length < this.col) chars.push(" ");
    chars[this.col] = ch;
    this.lines[this.row] = chars.join("");
    this.col += 1;
  }

  newline() {
    this.row += 1;
    this.col = 0;
    if (this.row === this.lines.length) this.lines.push("");
    const excess = this.lines.length - SCROLLBACK_LINES;
    if (excess > 0) { this.lines.splice(0, excess); this.row -= excess; }
  }

  clear() {
    this.lines = [""];
    this.row = 0;
    this.col = 0;
  }

  csi(final, params) {
    const numbers = params.replace(/^[?>=]/, "").split(";").map((p) => parseInt(p, 10));
    const n = numbers[0] || 1;
    const chars = [...this.lines[this.row]];
    switch (final) {
      case "C": this.col += n; break;
      case "D": this.col = Math.max(0, this.col - n); break;
      case "G": this.col = n - 1; break;
      case "A": this.row = Math.max(this.top(), this.row - n); break;
      case "B": for (let i = 0; i < n; i++) { const c = this.col; this.newline(); this.col = c; } break;
      case "H": case "f": {
        this.row = Math.min(this.top() + n - 1, this.lines.length - 1);
        this.col = (numbers[1] || 1) - 1;
        break;
      }
      case "K": { // erase in line: 0 to the end, 1 from the start, 2 all
        const mode = numbers[0] || 0;
        if (mode === 0) this.lines[this.row] = chars.slice(0, this.col).join("");
        else if (mode === 1) this.lines[this.row] = " ".repeat(this.col + 1) + chars.slice(this.col + 1).join("");
        else this.lines[this.row] = "";
        break;
      }
      case "J": { // erase in display: 0 below, 2 and 3 everything
        const mode = numbers[0] || 0;
        if (mode >= 2) { const r = this.row - this.top(); this.clear(); for (let i = 0; i < r; i++) this.newline(); }
        else if (mode === 0) { this.lines[this.row] = chars.slice(0, this.col).join(""); this.lines.length = this.row + 1; }
        break;
      }
      case "P": chars.splice(this.col, n); this.lines[this.row] = chars.join(""); break; // delete chars
      case "@": chars.splice(this.col, 0, ..." ".repeat(n)); this.lines[this.row] = chars.join(""); break;
      default: break; // colours (m) and the rest: dropped
    }
  }

  top() {
    return Math.max(0, this.lines.length - SCREEN_ROWS);
  }

  text() {
    return this.lines.join("\n");
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => { this.scheduled = false; this.render(); });
  }

  render() {
    const el = this.element;
    const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
    const before = this.lines.slice(0, this.row);
    const current = [...this.lines[this.row]];
    const head = current.slice(0, this.col);
    while (head.length < this.col) head.push(" ");
    const under = current[this.col] || " ";
    const tail = current.slice(this.col + 1).join("");
    const after = this.lines.slice(this.row + 1);
    const cursor = document.createElement("span");
    cursor.className = "cursor";
    cursor.textContent = under;
    const nodes = [
      document.createTextNode(before.map((l) => l + "\n").join("") + head.join("")),
      cursor,
      document.createTextNode(tail + after.map((l) => "\n" + l).join("")),
    ];
    for (const text of this.notices) {
      const span = document.createElement("span");
      span.className = "notice";
      span.textContent = "\n" + text;
      nodes.push(span);
    }
    el.replaceChildren(...nodes);
    if (atBottom) el.scrollTop = el.scrollHeight;
  }
}

const SPECIAL_KEYS = {
  Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b",
  ArrowUp: "\x1b[A", ArrowDown: "\x1b[B", ArrowRight: "\x1b[C", ArrowLeft: "\x1b[D",
  Home: "\x1b[H", End: "\x1b[F", Insert: "\x1b[2~", Delete: "\x1b[3~",
  PageUp: "\x1b[5~", PageDown: "\x1b[6~",
};

// What a terminal sends for a key press, or null to leave the key to the browser.
function keyBytes(event) {
  if (event.isComposing || event.metaKey) return null;
  if (event.ctrlKey && event.shiftKey) return null; // Ctrl+Shift+C/V: copy and paste
  const alt = event.altKey ? "\x1b" : "";
  if (event.key in SPECIAL_KEYS) return alt + SPECIAL_KEYS[event.key];
  if ([...event.key].length !== 1) return null; // Shift, F1, Dead...
  if (event.ctrlKey) {
    if (event.key === " ") return alt + "\x00";
    const code = event.key.toUpperCase().charCodeAt(0);
    return code >= 0x40 && code <= 0x5f ? alt + String.fromCharCode(code - 0x40) : null;
  }
  return alt + event.key;
}

function start() {
  const screenElement = document.getElementById("screen");
  const keyboard = document.getElementById("keyboard");
  const statusElement = document.getElementById("status");
  const screen = new Screen(screenElement);
  const encoder = new TextEncoder();
  const decoder = new TextDecoder("utf-8");
  let open = false;
  let over = false;

  function setStatus(state, text) {
    statusElement.dataset.state = state;
    statusElement.textContent = text;
  }

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";

  function send(text) {
    if (open && text) ws.send(encoder.encode(text));
  }

  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      screen.write(decoder.decode(new Uint8Array(event.data), { stream: true }));
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "hello") {
      open = true;
      document.title = `console: ${message.domain}`;
      document.getElementById("title").textContent = message.domain;
      setStatus("connected", "connected");
    } else if (message.type === "end") {
      over = true;
      open = false;
      setStatus("ended", `console ended: ${message.reason}`);
      screen.notice(`[console ended: ${message.reason}]`);
    } else if (message.type === "closed") {
      over = true;
      open = false;
      setStatus("disconnected", `disconnected: ${message.reason}`);
      screen.notice(`[disconnected: ${message.reason}]`);
    }
  };

  ws.onclose = (event) => {
    open = false;
    if (over) return;
    const reason = event.reason || `the connection to the web console closed (code ${event.code})`;
    setStatus("disconnected", `disconnected: ${reason}`);
    screen.notice(`[disconnected: ${reason}; reload to reconnect]`);
  };

  // Keys arrive in a hidden text area: keydown gives what a terminal sends for
  // a key; text that no single key press gives (dead keys, input methods, a
  // virtual keyboard) comes as input or composition events.
  keyboard.addEventListener("keydown", (event) => {
    const bytes = keyBytes(event);
    if (bytes === null) return;
    event.preventDefault();
    send(bytes);
  });
  keyboard.addEventListener("input", (event) => {
    if (event.isComposing || event.inputType === "insertCompositionText") return;
    if (event.inputType === "insertLineBreak") send("\r");
    else if (event.data) send(event.data);
    keyboard.value = "";
  });
  keyboard.addEventListener("compositionend", (event) => {
    send(event.data);
    keyboard.value = "";
  });
  keyboard.addEventListener("paste", (event) => {
    const text = event.clipboardData ? event.clipboardData.getData("text") : "";
    event.preventDefault();
    send(text.replace(/\r?\n/g, "\r"));
  });
  document.addEventListener("mouseup", () => {
    if (!window.getSelection().toString()) keyboard.focus(); // a selection is for copying
  });
  keyboard.focus();
  screen.render();
}

document.addEventListener("DOMContentLoaded", start);

// A headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, taking one command
// per line of JSON on stdin and answering one line of JSON on stdout:
//   {"id": 1, "op": "goto", "page": "main", "url": "http://..."}  ->  {"id": 1, "ok": true, "value": ...}
// Every wait is Playwright's own (events and DOM polling inside the browser), with a timeout.
// The Rust side is node/tests/common/browser.rs; the tests are node/tests/dashboard.rs.
import { chromium } from "playwright-core";
import http from "node:http";
import readline from "node:readline";

const TIMEOUT = Number(process.env.KAAPANA_BROWSER_TIMEOUT_MS || 90000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // As root in a sandbox without a user namespace; no background traffic to Google.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
  ],
});

const pages = new Map();
const dialogs = [];
const servers = [];

async function page(name) {
  name = name || "main";
  if (!pages.has(name)) {
    const context = await browser.newContext({
      acceptDownloads: true,
      viewport: { width: 1280, height: 860 },
    });
    context.setDefaultTimeout(TIMEOUT);
    const p = await context.newPage();
    p.on("dialog", (d) => {
      dialogs.push(d.message());
      d.accept();
    });
    pages.set(name, p);
  }
  return pages.get(name);
}

const ops = {
  async goto(p, a) {
    const r = await p.goto(a.url, { waitUntil: "load" });
    return { status: r ? r.status() : null, url: p.url() };
  },
  // Clicks something that navigates (a link, a form's button) and waits for the new page.
  async clickNav(p, a) {
    const [response] = await Promise.all([
      p.waitForNavigation({ waitUntil: "load" }),
      p.locator(a.selector).first().click(),
    ]);
    return { status: response ? response.status() : null, url: p.url() };
  },
  async click(p, a) {
    await p.locator(a.selector).first().click();
    return null;
  },
  async fill(p, a) {
    await p.locator(a.selector).first().fill(a.value);
    return null;
  },
  async check(p, a) {
    await p.locator(a.selector).first().check();
    return null;
  },
  async setFiles(p, a) {
    await p.locator(a.selector).first().setInputFiles(a.path);
    return null;
  },
  async waitFor(p, a) {
    await p.locator(a.selector).first().waitFor({ state: a.state || "visible", timeout: a.timeout || TIMEOUT });
    return null;
  },
  // Waits until the element's text (a field's value) contains `text` (the page updates
  // itself meanwhile).
  async waitForText(p, a) {
    await p.waitForFunction(
      ([s, t]) => {
        const e = document.querySelector(s);
        if (e === null) return false;
        const field = ["INPUT", "TEXTAREA", "SELECT"].includes(e.tagName);
        return (field ? e.value : e.textContent).includes(t);
      },
      [a.selector, a.text],
      { timeout: a.timeout || TIMEOUT, polling: "raf" },
    );
    return await p.locator(a.selector).first().evaluate((e) =>
      ["INPUT", "TEXTAREA", "SELECT"].includes(e.tagName) ? e.value : e.textContent,
    );
  },
  async text(p, a) {
    return await p.locator(a.selector).first().textContent();
  },
  async texts(p, a) {
    return await p.locator(a.selector).allTextContents();
  },
  async count(p, a) {
    return await p.locator(a.selector).count();
  },
  async attr(p, a) {
    return await p.locator(a.selector).first().getAttribute(a.name);
  },
  async eval(p, a) {
    return await p.evaluate(a.js);
  },
  async url(p) {
    return p.url();
  },
  async screenshot(p, a) {
    await p.screenshot({ path: a.path, fullPage: a.fullPage !== false });
    return a.path;
  },
  async download(p, a) {
    const [d] = await Promise.all([p.waitForEvent("download"), p.locator(a.selector).first().click()]);
    await d.saveAs(a.path);
    return { path: a.path, suggested: d.suggestedFilename() };
  },
  async cookies(p) {
    return await p.context().cookies();
  },
  async dialogs() {
    return dialogs.splice(0);
  },
  // Loads `url` and reports how long the browser took: to the first byte, DOMContentLoaded
  // and load, from the Navigation Timing API.
  async timedGoto(p, a) {
    const r = await p.goto(a.url, { waitUntil: "load" });
    const t = await p.evaluate(() => {
      const n = performance.getEntriesByType("navigation")[0];
      return { ttfb: n.responseStart, dom: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.transferSize };
    });
    return { status: r ? r.status() : null, ...t };
  },
  // Serves `html` on a port of its own on 127.0.0.1 (another origin than the node's API):
  // the attacker's page of the cross-site tests. Returns its URL.
  async serve(_p, a) {
    const server = http.createServer((req, res) => {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(a.html);
    });
    await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
    servers.push(server);
    return `http://127.0.0.1:${server.address().port}/`;
  },
};

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: null, ok: false, error: `not JSON: ${e}` }) + "\n");
    continue;
  }
  if (msg.op === "quit") break;
  const op = ops[msg.op];
  let answer;
  if (!op) {
    answer = { id: msg.id, ok: false, error: `no op ${msg.op}` };
  } else {
    try {
      const p = await page(msg.page);
      answer = { id: msg.id, ok: true, value: await op(p, msg) };
    } catch (e) {
      answer = { id: msg.id, ok: false, error: String(e && e.message ? e.message : e) };
    }
  }
  process.stdout.write(JSON.stringify(answer === undefined ? null : answer) + "\n");
}
for (const s of servers) {
  s.closeAllConnections();
  s.close();
}
await browser.close();
process.exit(0);

// Drives Debian's Chromium (headless, through playwright-core) through tokenfused's dashboard, as
// tests/integration/dashboard_test.cc asks: reads the rendered page, turns the kill switch on and
// off through it, saves a screenshot, and lists every request the browser made. Prints one JSON
// object. Env: AGENT (http://127.0.0.1:PORT), TOKEN (the admin token), SCREENSHOT (a .png path).
import { chromium } from "playwright-core";

const agent = process.env.AGENT;
const out = { requests: [], blocked: [], console: [] };
let browser;
try {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    // As root in CI: no sandbox. The rest keeps Chromium from calling home at start.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-default-apps"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  // Every request any page of the context makes is listed; one that leaves the agent's origin is
  // refused and listed as blocked (the test fails on either).
  context.on("request", (r) => out.requests.push(r.url()));
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(agent + "/")) return route.continue();
    out.blocked.push(url);
    return route.abort();
  });
  const page = await context.newPage();
  page.on("console", (m) => out.console.push(m.type() + ": " + m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));

  await page.goto(agent + "/ui");
  await page.waitForSelector("body[data-loaded=true]");
  await page.waitForFunction(() => document.querySelectorAll("#tenants tbody tr").length >= 3 &&
                                   document.querySelectorAll("#alerts tbody tr").length >= 1);
  const read = () => page.evaluate(() => ({
    tenants: [...document.querySelectorAll("#tenants tbody tr")].map((r) => ({
      id: r.dataset.tenant,
      shown_id: r.querySelector(".tenant").textContent,
      spent: r.querySelector(".spent").textContent,
      share: Number(r.dataset.share),
      limits: [...r.querySelectorAll(".limit")].map((l) => l.textContent),
    })),
    platform: document.getElementById("platform-body").textContent,
    kill: document.getElementById("kill-state").textContent,
    kill_button: document.getElementById("kill-toggle").textContent,
    reservations: [...document.querySelectorAll("#reservations tbody tr")].map((r) =>
      [...r.children].map((c) => c.textContent)),
    alerts: [...document.querySelectorAll("#alerts tbody tr")].map((r) => [...r.children].map((c) => c.textContent)),
    ledger: [...document.querySelectorAll("#ledger tbody tr")].map((r) => [...r.children].map((c) => c.textContent)),
    ledger_locked: !document.getElementById("ledger-locked").hidden,
    chart_total: Number(document.querySelector("#chart svg")?.dataset.total ?? "NaN"),
    chart_bars: document.querySelectorAll("#chart rect").length,
    injected: document.querySelectorAll("#tenants img, #tenants script").length,
  }));
  out.before = await read();

  // A wrong token first: refused, and said so.
  await page.click("#kill-toggle");
  await page.fill("#token", "not-the-token");
  await page.fill("#kill-reason", "browser test");
  await page.click("#kill-confirm");
  await page.waitForFunction(() => document.getElementById("kill-error").textContent !== "");
  out.wrong_token_error = await page.textContent("#kill-error");
  out.after_wrong = (await read()).kill;
  // The right one: the switch turns on, and the ledger (admin only) shows.
  await page.fill("#token", process.env.TOKEN);
  await page.click("#kill-confirm");
  await page.waitForFunction(() => document.getElementById("kill-state").textContent === "on");
  await page.waitForFunction(() => document.querySelectorAll("#ledger tbody tr").length > 0);
  out.on = await read();
  out.api_on = await (await fetch(agent + "/v1/kill")).json();
  out.token_stored = await page.evaluate((t) =>
    JSON.stringify(localStorage).includes(t) || JSON.stringify(sessionStorage).includes(t) ||
    document.cookie.includes(t) || document.getElementById("token").value.includes(t), process.env.TOKEN);
  await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  // And off again: the token is still in the page's memory, so it is not asked for.
  await page.click("#kill-toggle");
  out.token_asked_again = await page.isVisible("#token");
  await page.click("#kill-confirm");
  await page.waitForFunction(() => document.getElementById("kill-state").textContent === "off");
  out.off = (await read()).kill;
  out.api_off = await (await fetch(agent + "/v1/kill")).json();
} catch (e) {
  out.uncaught = String(e && e.stack ? e.stack : e);
} finally {
  if (browser) await browser.close();
}
console.log(JSON.stringify(out));

/**
 * Shared pieces of the console's browser tests (test/e2e/console-*.test.ts): Debian's chromium
 * driven by playwright-core (never a downloaded browser; the test fails when it is missing),
 * HTTPS requests to the server trusting its CA, the page's action outcome, screenshots.
 */
import type { Test } from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import type { SpawnedServer } from '../src/server/spawn.js';
import type { Cleanup } from './cleanup.js';

export const CHROMIUM = '/usr/bin/chromium';

/** Waits are safety nets against a hang, never speed requirements. */
export const LONG = 150_000;

/** A fresh headless Chromium profile, closed when the test ends. */
export async function launchBrowser(t: Test, c: Cleanup): Promise<{ ctx: BrowserContext; page: Page }> {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is required for this test (apt-get install chromium)`);
  const ctx = await chromium.launchPersistentContext(c.dir('chromium-profile-'), {
    executablePath: CHROMIUM, headless: true,
    // the server's own CA is not in Chromium's store: loopback test only
    ignoreHTTPSErrors: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1440, height: 900 },
  });
  t.teardown(() => ctx.close());
  const page = ctx.pages()[0] ?? await ctx.newPage();
  page.setDefaultTimeout(LONG);
  page.on('dialog', (d) => void d.accept());
  return { ctx, page };
}

/** Screenshots into .tap/artifacts/<name>/<run>/, each named in the test log. */
export async function screenshots(t: Test, name: string): Promise<(page: Page, what: string) => Promise<void>> {
  const dir = path.resolve('.tap', 'artifacts', name, new Date().toISOString().replace(/[:.]/g, '-'));
  await fsp.mkdir(dir, { recursive: true });
  t.comment(`screenshots: ${dir}`);
  let n = 0;
  return async (page, what) => {
    const file = path.join(dir, `${String(++n).padStart(2, '0')}-${what}.png`);
    await page.screenshot({ path: file, fullPage: true });
    t.comment(`screenshot ${file}`);
  };
}

export const consoleUrl = (server: SpawnedServer) => server.info.url.replace(/^wss:/, 'https:');

/** Logs in through the login page; the page ends on the overview. */
export async function login(page: Page, server: SpawnedServer, name: string, password: string): Promise<void> {
  await page.goto(`${consoleUrl(server)}/console/login`);
  await page.fill('input[name=name]', name);
  await page.fill('input[name=password]', password);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  if (!/\/console\/$/.test(page.url())) throw new Error(`login as ${name} failed: ${page.url()} ${await page.textContent('body')}`);
}

export interface Answer { status: number; headers: Record<string, string | string[] | undefined>; body: string }

/** One HTTPS request to the server, trusting its CA (as a script or curl would). */
export function request(server: SpawnedServer, method: string, p: string, o: { headers?: Record<string, string>; body?: string } = {}): Promise<Answer> {
  const base = new URL(consoleUrl(server));
  return new Promise((resolve, reject) => {
    const req = https.request({ host: base.hostname, port: base.port, path: p, method, ca: fs.readFileSync(server.info.caFile!), headers: o.headers }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end(o.body);
  });
}

/** GET of the JSON API with the operator's bearer token. */
export async function apiGet<T>(server: SpawnedServer, p: string): Promise<T> {
  const token = (await fsp.readFile(server.info.tokenFile, 'utf8')).trim();
  const r = await request(server, 'GET', p, { headers: { authorization: `Bearer ${token}` } });
  if (r.status !== 200) throw new Error(`GET ${p}: ${r.status} ${r.body}`);
  return JSON.parse(r.body) as T;
}

/** Empties the page's #flash, so the next outcome is the next action's. */
export async function clearFlash(page: Page): Promise<void> {
  await page.evaluate(() => { const f = document.getElementById('flash'); if (f) { f.className = ''; f.textContent = ''; } });
}

/** The outcome of the action just started on the page: the #flash text once it is no longer "running". */
export async function outcome(page: Page): Promise<string> {
  await page.waitForFunction(() => /\b(ok|bad)\b/.test(document.getElementById('flash')?.className ?? ''), undefined, { timeout: LONG });
  return ((await page.textContent('#flash')) ?? '').trim();
}

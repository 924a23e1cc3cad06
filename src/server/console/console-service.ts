/**
 * The operator console: routes everything under /console (and / itself) on the server's HTTPS
 * listener. api.ts hands these requests over before its bearer-token check; the console has its
 * own authentication (operator login, server-side sessions) and never accepts the bearer token.
 *
 *   GET  /                         302 to /console/
 *   GET  /console/assets/NAME      uPlot, console.js, console.css (no login needed)
 *   GET  /console/login            the login page;  POST: name + password (form)
 *   POST /console/logout           (form, _csrf)
 *   GET  /console/, /machine/A, /disk/A/D, /events, /jobs, /audit, /policies     pages (pages.ts)
 *   GET  /console/live?page=...    server-sent events (live.ts)
 *   GET  /console/api/v1/...       the JSON API's read routes (status, history, events, alerts, points, machines, policies)
 *   POST /console/api/v1/...       the JSON API's actions: test-failover, failover, enable, disable, cut, policies,
 *                                  policies/assign; CSRF token + same origin required (csrf.ts); audited and shown as jobs
 *
 * Actions go through the JSON API's own handler (ConsoleDeps.operatorApi): the console adds
 * authentication, CSRF, the audit record and the job, never its own copy of what an action does.
 * Every login (success, wrong password, rate-limited), logout and action (or its refusal for a
 * missing CSRF token) is written to the audit log with who, what, target, result and when.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, toMobilityError } from '../../errors.js';
import { MAX_BODY, send, statusFor } from '../http/http-util.js';
import { serveAsset } from './assets.js';
import type { ConsoleDeps, OperatorConsole } from './console-view.js';
import { CSRF_FIELD, checkCsrf, checkOrigin } from './csrf.js';
import { JobBoard } from './jobs.js';
import { LiveHub } from './live.js';
import { LoginLimiter, type LoginLimiterOptions } from './login-limiter.js';
import { esc, layout, loginPage, pageBody, type View } from './pages.js';
import { verifyDecoy, verifyPassword } from './passwords.js';
import { SessionManager, sessionIdOf, type Session, type SessionOptions } from './sessions.js';

/** Read routes of the JSON API a logged-in operator may call through the console. */
const READ_ROUTES = new Set(['/v1/status', '/v1/history', '/v1/events', '/v1/alerts', '/v1/points', '/v1/machines', '/v1/policies']);

/** Actions of the JSON API the console offers, with the audit name of each. */
const ACTIONS: Record<string, (b: Record<string, unknown>) => { action: string; target: string; agent: string | null }> = {
  '/v1/test-failover': (b) => ({ action: b.cleanup === true ? 'test-failover-cleanup' : 'test-failover', target: `${str(b.agent)} point ${str(b.point) || 'latest'}`, agent: str(b.agent) || null }),
  '/v1/failover': (b) => ({ action: 'failover', target: `${str(b.agent)} point ${str(b.point) || 'latest'}`, agent: str(b.agent) || null }),
  '/v1/enable': (b) => ({ action: 'enable', target: `${str(b.machine)} ${str(b.disk)}${str(b.diskId) ? ` as ${str(b.diskId)}` : ''}`, agent: str(b.machine) || null }),
  '/v1/disable': (b) => ({ action: 'disable', target: `${str(b.machine)}/${str(b.disk)}${b.keepReplica === true ? ' (replica kept)' : ''}`, agent: str(b.machine) || null }),
  '/v1/cut': (b) => ({ action: 'cut', target: `${str(b.machine)} ${str(b.kind) || 'crash'}`, agent: str(b.machine) || null }),
  '/v1/policies': (b) => ({ action: 'policy-save', target: str(b.name), agent: null }),
  '/v1/policies/assign': (b) => ({ action: 'policy-assign', target: `${str(b.policy)} to ${str(b.machine)}`, agent: str(b.machine) || null }),
};

function str(v: unknown): string {
  return typeof v === 'string' ? v.slice(0, 200) : v === undefined || v === null ? '' : JSON.stringify(v).slice(0, 200);
}

const SECURITY_HEADERS = {
  'content-security-policy': "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
  'x-frame-options': 'DENY', 'x-content-type-options': 'nosniff', 'referrer-policy': 'same-origin', 'cache-control': 'no-store',
};

export interface ConsoleOptions {
  sessions?: SessionOptions;
  limiter?: LoginLimiterOptions;
  /** Live update interval (default 1 s). */
  liveIntervalMs?: number;
}

async function readRaw(req: IncomingMessage, limit = MAX_BODY): Promise<Buffer> {
  let size = 0;
  const parts: Buffer[] = [];
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > limit) throw new MobilityError('MOB_ERR_USAGE', `request body over ${limit} bytes`);
    parts.push(c as Buffer);
  }
  return Buffer.concat(parts);
}

/** The request again, for the JSON API, with this path and the body already read. */
function replay(req: IncomingMessage, path: string, body: Buffer): IncomingMessage {
  const r = new http.IncomingMessage(req.socket);
  r.method = req.method;
  r.url = path;
  r.headers = { ...req.headers, 'content-length': String(body.length) };
  // complete, as the parser marks a request it has read whole: else, once read, the message
  // destroys itself as aborted and takes the connection (the real request's) with it
  r.complete = true;
  r.push(body);
  r.push(null);
  return r;
}

/** Collects what the handler writes to res (the first 256 KiB), to audit the answer. */
function capture(res: ServerResponse): () => string {
  const parts: Buffer[] = [];
  let size = 0;
  const keep = (c: unknown) => {
    if (size > 256 * 1024) return;
    if (typeof c === 'string') { parts.push(Buffer.from(c)); size += c.length; } else if (Buffer.isBuffer(c)) { parts.push(c); size += c.length; }
  };
  const write = res.write;
  const end = res.end;
  res.write = function (this: ServerResponse, ...args: unknown[]) {
    keep(args[0]);
    return (write as (...a: unknown[]) => boolean).apply(this, args);
  } as ServerResponse['write'];
  res.end = function (this: ServerResponse, ...args: unknown[]) {
    if (typeof args[0] !== 'function') keep(args[0]);
    return (end as (...a: unknown[]) => ServerResponse).apply(this, args);
  } as ServerResponse['end'];
  return () => Buffer.concat(parts).toString('utf8');
}

function redirect(res: ServerResponse, to: string, headers: Record<string, string> = {}): void {
  res.writeHead(303, { location: to, 'cache-control': 'no-store', ...headers });
  res.end();
}

function html(res: ServerResponse, status: number, body: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', ...SECURITY_HEADERS, ...headers });
  res.end(body);
}

export class ConsoleService implements OperatorConsole {
  readonly sessions: SessionManager;
  readonly limiter: LoginLimiter;
  readonly jobs = new JobBoard();
  private readonly live: LiveHub;

  constructor(private readonly deps: ConsoleDeps, o: ConsoleOptions = {}) {
    this.sessions = new SessionManager(deps.server.db, o.sessions);
    this.limiter = new LoginLimiter(o.limiter);
    this.live = new LiveHub(deps, this.jobs, this.sessions, { intervalMs: o.liveIntervalMs });
  }

  private get scheme(): 'https' | 'http' { return this.deps.server.identity ? 'https' : 'http'; }

  close(): void { this.live.close(); }

  async handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    try {
      await this.route(req, res, url);
    } catch (err) {
      const e = toMobilityError(err);
      if (e.code === 'MOB_ERR_INTERNAL') this.deps.server.log.error('console request failed', { path: url.pathname, code: e.code, error: e.message });
      if (res.headersSent) { res.end(); return; }
      req.resume();
      const wantsJson = url.pathname.startsWith('/console/api/') || url.pathname === '/console/live' || !(req.headers.accept ?? '').includes('text/html');
      if (wantsJson) send(res, statusFor(e.code), { code: e.code, message: e.message });
      else html(res, statusFor(e.code), `<!doctype html><meta charset="utf-8"><title>${esc(e.code)}</title><link rel="stylesheet" href="/console/assets/console.css"><main><h1>${esc(e.code)}</h1><p>${esc(e.message)}</p><p><a href="/console/">Back to the console</a></p></main>`);
    }
  }

  private source(req: IncomingMessage): string {
    return req.socket.remoteAddress ?? '?';
  }

  private audit(s: { operator: string; source: string }, action: string, target: string, result: string, detail = ''): void {
    try {
      this.deps.server.db.addAudit({ t: Date.now(), operator: s.operator.slice(0, 64), source: s.source, action, target: target.slice(0, 300), result, detail: detail.slice(0, 1000) });
    } catch (err) {
      // the action itself is done or refused either way; the failure to record it is logged
      this.deps.server.log.error('console audit record failed', { action, target, error: (err as Error).message });
    }
  }

  private async route(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    const p = url.pathname;
    const m = req.method ?? 'GET';
    if (p === '/' || p === '/console') { req.resume(); res.writeHead(302, { location: '/console/' }); res.end(); return; }
    if (p.startsWith('/console/assets/')) {
      req.resume();
      if ((m === 'GET' || m === 'HEAD') && serveAsset(req, res, p.slice('/console/assets/'.length))) return;
      throw new MobilityError('MOB_ERR_USAGE', `no such console asset: ${p}`);
    }
    if (p === '/console/login') {
      if (m === 'POST') return this.login(req, res);
      req.resume();
      if (this.sessions.get(sessionIdOf(req))) return redirect(res, '/console/');
      return html(res, 200, loginPage({}));
    }
    const session = this.sessions.get(sessionIdOf(req));
    if (p === '/console/logout' && m === 'POST') return this.logout(req, res, session);
    if (!session) {
      req.resume();
      if (m === 'GET' && !p.startsWith('/console/api/') && p !== '/console/live') return redirect(res, '/console/login');
      throw new MobilityError('MOB_ERR_SESSION', 'not logged in to the console (or the session expired): log in at /console/login');
    }
    if (p.startsWith('/console/api/')) return this.api(req, res, url, session);
    if (m !== 'GET') { req.resume(); throw new MobilityError('MOB_ERR_USAGE', `no such console endpoint: ${m} ${p}`); }
    req.resume();
    if (p === '/console/live') return this.live.open(res, viewOf(url.searchParams), session.id);
    const view = pageView(p, url.searchParams);
    if (!view) throw new MobilityError('MOB_ERR_USAGE', `no such console page: ${p}`);
    const status = await this.deps.status();
    const page = await pageBody(view, { server: this.deps.server, status, jobs: this.jobs, now: Date.now() });
    html(res, 200, layout({ title: page.title, operator: session.operator, csrf: session.csrf, view, body: page.body }));
  }

  private async login(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const source = this.source(req);
    checkOrigin(req, this.scheme);
    const form = new URLSearchParams((await readRaw(req, 8192)).toString('utf8'));
    const name = (form.get('name') ?? '').slice(0, 64);
    const password = form.get('password') ?? '';
    try {
      this.limiter.begin(source);
    } catch (err) {
      const e = toMobilityError(err);
      // audited once per source and window: a flood of refused logins does not flood the audit log
      if ((err as { first?: boolean }).first) this.audit({ operator: name, source }, 'login', 'console', e.code, `${e.message} (further refusals from this address in this window are not recorded)`);
      return html(res, statusFor(e.code), loginPage({ error: `Too many failed logins from your address: ${e.message}.`, name }));
    }
    let ok = false;
    let op: ReturnType<typeof this.deps.server.db.getOperator> = null;
    try {
      op = name ? this.deps.server.db.getOperator(name) : null;
      ok = op ? await verifyPassword(password, op.passwordHash) : await verifyDecoy(password);
    } finally {
      this.limiter.end(source, ok && op !== null);
    }
    if (!ok || !op) {
      this.audit({ operator: name, source }, 'login', 'console', 'MOB_ERR_AUTH', op ? 'wrong password' : 'no such operator');
      this.deps.server.log.warn('console login refused', { operator: name, peer: source });
      return html(res, 401, loginPage({ error: 'Wrong operator name or password.', name }));
    }
    const s = this.sessions.create(op.name, source);
    this.deps.server.db.touchOperatorLogin(op.name, s.createdAt);
    this.audit(s, 'login', 'console', 'ok');
    this.deps.server.log.info('console login', { operator: op.name, peer: source });
    redirect(res, '/console/', { 'set-cookie': this.sessions.cookie(s) });
  }

  private async logout(req: IncomingMessage, res: ServerResponse, session: Session | null): Promise<void> {
    const form = new URLSearchParams((await readRaw(req, 8192)).toString('utf8'));
    if (session) {
      try {
        checkCsrf(req, this.scheme, session.csrf, form.get(CSRF_FIELD));
      } catch (err) {
        this.audit(session, 'logout', 'console', toMobilityError(err).code, toMobilityError(err).message);
        throw err;
      }
      this.sessions.destroy(session.id);
      this.audit(session, 'logout', 'console', 'ok');
    }
    redirect(res, '/console/login', { 'set-cookie': SessionManager.clearCookie() });
  }

  private async api(req: IncomingMessage, res: ServerResponse, url: URL, session: Session): Promise<void> {
    const path = url.pathname.slice('/console/api'.length);
    if (req.method === 'GET' && READ_ROUTES.has(path)) {
      return this.deps.operatorApi(replay(req, path + url.search, Buffer.alloc(0)), res);
    }
    const describe = req.method === 'POST' ? ACTIONS[path] : undefined;
    if (!describe) { req.resume(); throw new MobilityError('MOB_ERR_USAGE', `the console offers no ${req.method} ${path}`); }
    let raw: Buffer;
    let body: Record<string, unknown>;
    try {
      checkCsrf(req, this.scheme, session.csrf);
      raw = await readRaw(req);
      const v = JSON.parse(raw.toString('utf8') || '{}') as unknown;
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new MobilityError('MOB_ERR_USAGE', 'the request body is not a JSON object');
      body = v as Record<string, unknown>;
    } catch (err) {
      const e = err instanceof SyntaxError ? new MobilityError('MOB_ERR_USAGE', `the request body is not JSON: ${err.message}`) : toMobilityError(err);
      this.audit(session, describe({}).action, '', e.code, e.message);
      this.deps.server.log.warn('console action refused', { operator: session.operator, path, code: e.code });
      throw e;
    }
    // the console answers in one JSON document, and writes no files of the server's choosing
    delete body.stream;
    delete body.download;
    raw = Buffer.from(JSON.stringify(body));
    const d = describe(body);
    const job = this.jobs.start(d.action, d.target, d.agent, session.operator);
    const answer = capture(res);
    await this.deps.operatorApi(replay(req, path, raw), res);
    const text = answer();
    let result = 'ok';
    let summary = 'done';
    try {
      const j = JSON.parse(text) as { code?: string; message?: string };
      if (res.statusCode >= 400) { result = j.code ?? `HTTP ${res.statusCode}`; summary = `${result}: ${j.message ?? ''}`; } else summary = summarize(d.action, j);
    } catch {
      if (res.statusCode >= 400) { result = `HTTP ${res.statusCode}`; summary = result; }
    }
    this.jobs.finish(job, result === 'ok', summary);
    this.audit(session, d.action, d.target, result, summary);
    this.deps.server.log.info('console action', { operator: session.operator, action: d.action, target: d.target, result });
  }
}

/** One line of what an action did, from the API's answer. */
function summarize(action: string, j: Record<string, unknown>): string {
  const point = (j.point as { id?: string } | undefined)?.id;
  const disks = Array.isArray(j.disks) ? (j.disks as { diskId?: string; method?: string }[]) : [];
  switch (action) {
    case 'test-failover': return `${point}: ${disks.map((x) => `${x.diskId} (${x.method})`).join(', ')} ready`;
    case 'test-failover-cleanup': return `${point}: ${disks.length} image(s) removed`;
    case 'cut': return `point ${point} recorded`;
    default: return JSON.stringify(j).slice(0, 300);
  }
}

function idOrNull(v: string | null | undefined): string | null {
  return v && ID_PATTERN.test(v) ? v : null;
}

/** The page a path names; null for none. */
export function pageView(p: string, q: URLSearchParams = new URLSearchParams()): View | null {
  const parts = p.split('/').filter(Boolean).map((x) => { try { return decodeURIComponent(x); } catch { return ''; } });
  if (parts[0] !== 'console') return null;
  const [, page, a, b] = parts;
  if (parts.length === 1) return { page: 'overview' };
  if (parts.length === 2 && (page === 'events' || page === 'jobs' || page === 'audit' || page === 'policies' || page === 'plans')) return { page };
  if (parts.length === 2 && page === 'capacity') return { page, rpo: (q.get('rpo') ?? '').slice(0, 20), retention: (q.get('retention') ?? '').slice(0, 20), bandwidth: (q.get('bandwidth') ?? '').slice(0, 20) };
  if (page === 'machine' && parts.length === 3 && idOrNull(a)) return { page: 'machine', agent: a };
  if (page === 'disk' && parts.length === 4 && idOrNull(a) && idOrNull(b)) return { page: 'disk', agent: a, disk: b };
  return null;
}

/** The view a live stream asks for (?page=...&agent=...&disk=...): MOB_ERR_USAGE when it names none. */
function viewOf(q: URLSearchParams): View {
  const page = q.get('page');
  const agent = idOrNull(q.get('agent'));
  const disk = idOrNull(q.get('disk'));
  if (page === 'overview' || page === 'events' || page === 'jobs' || page === 'audit' || page === 'policies' || page === 'plans') return { page };
  if (page === 'capacity') return { page, rpo: '', retention: '', bandwidth: '' };
  if (page === 'machine' && agent) return { page, agent };
  if (page === 'disk' && agent && disk) return { page, agent, disk };
  throw new MobilityError('MOB_ERR_USAGE', `live updates need page=overview|machine|disk|events|jobs with a valid agent (and disk), got ${JSON.stringify(q.toString())}`);
}

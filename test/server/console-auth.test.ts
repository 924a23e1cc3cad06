/**
 * The console's authentication pieces on their own: scrypt password hashes, server-side
 * sessions in a real configuration database (with an injected clock), the CSRF and Origin
 * checks, the per-source login limit, operators and the audit log. The browser test
 * (test/e2e/console-browser.test.ts) drives the same pieces through a real server.
 */
import t from 'tap';
import http from 'node:http';
import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { ConfigDb, MIGRATIONS } from '../../src/server/config-db.js';
import { checkCsrf, checkOrigin, tokensEqual } from '../../src/server/console/csrf.js';
import { LoginLimiter } from '../../src/server/console/login-limiter.js';
import { hashPassword, verifyDecoy, verifyPassword } from '../../src/server/console/passwords.js';
import { SESSION_COOKIE, SessionManager, sessionIdOf } from '../../src/server/console/sessions.js';
import { pageView } from '../../src/server/console/console-service.js';
import { esc } from '../../src/server/console/pages.js';
import { MobilityError } from '../../src/errors.js';
import { tmpDir } from '../helpers.js';

function request(headers: Record<string, string>): http.IncomingMessage {
  const r = new http.IncomingMessage(new net.Socket());
  r.headers = headers;
  return r;
}

const codeOf = (fn: () => unknown): string | null => {
  try { fn(); return null; } catch (err) { return err instanceof MobilityError ? err.code : `not coded: ${String(err)}`; }
};

t.test('passwords: salted scrypt, verified in constant time, tampered or wrong ones refused', async (t) => {
  const h1 = await hashPassword('correct horse battery');
  const h2 = await hashPassword('correct horse battery');
  t.match(h1, /^scrypt\$15\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/, 'self-describing format with the default cost');
  t.not(h1, h2, 'a fresh salt each time: the same password hashes differently');
  t.notOk(h1.includes('correct horse'), 'the password is not in the hash');
  t.equal(await verifyPassword('correct horse battery', h1), true);
  t.equal(await verifyPassword('correct horse battery', h2), true);
  t.equal(await verifyPassword('correct horse batterY', h1), false, 'one character off is refused');
  t.equal(await verifyPassword('', h1), false);
  const parts = h1.split('$');
  const flipped = Buffer.from(parts[5], 'base64');
  flipped[0] ^= 1;
  t.equal(await verifyPassword('correct horse battery', [...parts.slice(0, 5), flipped.toString('base64')].join('$')), false, 'a changed key is refused');
  t.equal(await verifyPassword('correct horse battery', 'scrypt$30$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=='), false, 'an absurd cost in a tampered row is refused, not computed');
  t.equal(await verifyPassword('correct horse battery', 'plain'), false, 'an unreadable hash is refused');
  const cheap = await hashPassword('another password', { logN: 10 });
  t.match(cheap, /^scrypt\$10\$/, 'the cost is recorded in the hash');
  t.equal(await verifyPassword('another password', cheap), true, 'verification uses the stored cost');
  t.equal(await verifyDecoy('anything at all'), false, 'the decoy (unknown operator) never matches');
  await t.rejects(hashPassword('short'), { code: 'MOB_ERR_USAGE' }, 'a password under 10 characters is refused');
  await t.rejects(hashPassword('x'.repeat(1025)), { code: 'MOB_ERR_USAGE' });
});

t.test('operators, sessions and the audit log in the configuration database', async (t) => {
  const dir = await tmpDir(t);
  const db = ConfigDb.open(dir);
  t.teardown(() => db.close());
  t.equal(db.schemaVersion, MIGRATIONS.length, 'the console migration is applied');
  let now = 1_000_000;
  const sm = new SessionManager(db, { idleMs: 30 * 60_000, maxAgeMs: 2 * 3600_000, now: () => now });

  t.equal(db.putOperator('alice', await hashPassword('alice password 1', { logN: 10 })), 'created');
  const s = sm.create('alice', '127.0.0.1');
  t.match(s.id, /^[A-Za-z0-9_-]{43}$/, '32 random bytes, base64url');
  t.match(s.csrf, /^[A-Za-z0-9_-]{43}$/);
  t.not(s.id, s.csrf);
  t.equal(sm.get(s.id)?.operator, 'alice', 'the session is found by its id');
  t.equal(sm.get(s.id)?.csrf, s.csrf, 'with its CSRF token');
  t.equal(sm.get('not-a-session'), null);
  t.equal(sm.get(null), null);
  t.equal(db.getSession(s.id), null, 'the store is not keyed by the id itself');
  // the id appears nowhere in the database file
  const raw = new Database(path.join(dir, 'config.db'), { readonly: true });
  const rows = raw.prepare('SELECT * FROM console_sessions').all() as Record<string, unknown>[];
  raw.close();
  t.equal(rows.length, 1);
  t.notOk(JSON.stringify(rows).includes(s.id), 'only a hash of the session id is stored');

  const cookie = sm.cookie(s);
  t.match(cookie, new RegExp(`^${SESSION_COOKIE}=${s.id}; `));
  for (const attr of ['Secure', 'HttpOnly', 'SameSite=Strict', 'Path=/']) t.ok(cookie.split('; ').includes(attr), `cookie has ${attr}`);
  t.equal(sessionIdOf(request({ cookie: `a=b; ${SESSION_COOKIE}=${s.id}; c=d` })), s.id, 'the id is read from the Cookie header');
  t.equal(sessionIdOf(request({})), null);
  t.match(SessionManager.clearCookie(), /Max-Age=0/);

  // idle expiry slides with use
  now += 20 * 60_000;
  t.ok(sm.get(s.id), 'used after 20 min: alive, and the idle expiry slides');
  now += 20 * 60_000;
  t.ok(sm.get(s.id), '40 min after login, 20 min after last use: alive');
  now += 31 * 60_000;
  t.equal(sm.get(s.id), null, 'idle for over 30 min: expired');
  t.equal(db.getSession(rows[0].id_hash as string), null, 'and deleted');

  // absolute age limit
  const s2 = sm.create('alice', '127.0.0.1');
  for (let i = 0; i < 11; i++) { now += 10 * 60_000; t.ok(sm.get(s2.id), `in use at ${(i + 1) * 10} min`); }
  now += 10 * 60_000;
  t.equal(sm.get(s2.id), null, 'at the 2 h maximum age the session ends even though in use');

  // logout, password change and removal end sessions
  const s3 = sm.create('alice', '127.0.0.1');
  sm.destroy(s3.id);
  t.equal(sm.get(s3.id), null, 'logout ends the session');
  const s4 = sm.create('alice', '127.0.0.1');
  t.equal(db.putOperator('alice', await hashPassword('alice password 2', { logN: 10 })), 'updated');
  t.equal(sm.get(s4.id), null, 'a new password ends the operator\'s sessions');
  t.ok(await verifyPassword('alice password 2', db.getOperator('alice')!.passwordHash));
  const s5 = sm.create('alice', '127.0.0.1');
  t.equal(db.removeOperator('alice'), true);
  t.equal(db.removeOperator('alice'), false, 'removing twice says there was none');
  t.equal(sm.get(s5.id), null, 'removing the operator ends its sessions');
  t.same(db.listOperators(), []);

  // audit: newest first, everything kept
  db.addAudit({ t: 1, operator: 'bob', source: '10.0.0.1', action: 'login', target: 'console', result: 'MOB_ERR_AUTH', detail: 'wrong password' });
  db.addAudit({ t: 2, operator: 'bob', source: '10.0.0.1', action: 'test-failover', target: 'web1 point latest', result: 'ok', detail: 'p-3: d0 ready' });
  t.same(db.listAudit().map((a) => [a.t, a.action, a.result]), [[2, 'test-failover', 'ok'], [1, 'login', 'MOB_ERR_AUTH']]);
  t.equal(fs.statSync(path.join(dir, 'config.db')).mode & 0o777, 0o600, 'the database (password hashes, sessions) is 0600');
});

t.test('CSRF: the session token (constant-time compare) and a same-origin request are both required', async (t) => {
  const token = 'tok-' + 'a'.repeat(40);
  t.equal(tokensEqual(token, token), true);
  t.equal(tokensEqual(token, token.slice(0, -1) + 'b'), false);
  t.equal(tokensEqual(token, token.slice(0, 10)), false, 'a prefix is not the token');
  t.equal(tokensEqual(token, ''), false);
  t.equal(tokensEqual(token, undefined), false);
  t.equal(tokensEqual(token, 'x'.repeat(300)), false);

  const host = '127.0.0.1:8443';
  t.equal(codeOf(() => checkCsrf(request({ host, 'x-csrf-token': token }), 'https', token)), null, 'header token, no Origin (a plain client): accepted');
  t.equal(codeOf(() => checkCsrf(request({ host, origin: `https://${host}`, 'x-csrf-token': token, 'sec-fetch-site': 'same-origin' }), 'https', token)), null, 'a same-origin browser request: accepted');
  t.equal(codeOf(() => checkCsrf(request({ host }), 'https', token, token)), null, 'the form field instead of the header: accepted');
  t.equal(codeOf(() => checkCsrf(request({ host }), 'https', token)), 'MOB_ERR_CSRF', 'no token: refused');
  t.equal(codeOf(() => checkCsrf(request({ host, 'x-csrf-token': 'guess' }), 'https', token)), 'MOB_ERR_CSRF', 'a wrong token: refused');
  t.equal(codeOf(() => checkCsrf(request({ host, 'x-csrf-token': 'guess' }), 'https', token, token)), 'MOB_ERR_CSRF', 'a wrong header is not rescued by the form field');
  t.equal(codeOf(() => checkCsrf(request({ host, origin: 'https://evil.example', 'x-csrf-token': token }), 'https', token)), 'MOB_ERR_CSRF', 'another origin: refused even with the token');
  t.equal(codeOf(() => checkCsrf(request({ host, origin: `http://${host}`, 'x-csrf-token': token }), 'https', token)), 'MOB_ERR_CSRF', 'another scheme is another origin');
  t.equal(codeOf(() => checkCsrf(request({ host, 'sec-fetch-site': 'cross-site', 'x-csrf-token': token }), 'https', token)), 'MOB_ERR_CSRF', 'Sec-Fetch-Site cross-site: refused');
  t.equal(codeOf(() => checkOrigin(request({ host, origin: `https://${host}` }), 'https')), null);
  t.equal(codeOf(() => checkOrigin(request({ origin: `https://${host}` }), 'https')), 'MOB_ERR_CSRF', 'an Origin without a Host cannot be matched');
});

t.test('login limit per source address', async (t) => {
  let now = 0;
  const l = new LoginLimiter({ limit: 3, windowMs: 60_000, maxSources: 4, now: () => now });
  for (let i = 0; i < 3; i++) { t.equal(codeOf(() => l.check('10.0.0.1')), null, `attempt ${i + 1} allowed`); l.fail('10.0.0.1'); }
  t.equal(codeOf(() => l.check('10.0.0.1')), 'MOB_ERR_RATE_LIMITED', 'the 4th attempt within the window is refused');
  t.equal(codeOf(() => l.check('10.0.0.2')), null, 'another address is not affected');
  now += 59_000;
  t.equal(codeOf(() => l.check('10.0.0.1')), 'MOB_ERR_RATE_LIMITED', 'still refused inside the window');
  now += 1_000;
  t.equal(codeOf(() => l.check('10.0.0.1')), null, 'allowed again once the window passed');
  // bounded: the oldest addresses go when full
  for (const a of ['a', 'b', 'c', 'd', 'e']) for (let i = 0; i < 3; i++) l.fail(a);
  t.equal(codeOf(() => l.check('e')), 'MOB_ERR_RATE_LIMITED');
  t.equal(codeOf(() => l.check('a')), null, 'the oldest entry was evicted to stay within maxSources');
});

t.test('page paths and escaping', async (t) => {
  t.same(pageView('/console/'), { page: 'overview' });
  t.same(pageView('/console/machine/web1'), { page: 'machine', agent: 'web1' });
  t.same(pageView('/console/disk/web1/d0'), { page: 'disk', agent: 'web1', disk: 'd0' });
  t.same(pageView('/console/audit'), { page: 'audit' });
  t.equal(pageView('/console/machine/..%2Fetc'), null, 'an id outside [A-Za-z0-9._-] names no page');
  t.equal(pageView('/console/machine/%E0%A4%A'), null, 'bad percent-encoding names no page');
  t.equal(pageView('/console/nothing'), null);
  t.equal(esc('<img src=x onerror="a()">&\''), '&lt;img src=x onerror=&quot;a()&quot;&gt;&amp;&#39;');
});

t.test('login limit: checks still running count, so concurrent guesses cannot all pass; refusals are reported once', async (t) => {
  let now = 1_000_000;
  const l = new LoginLimiter({ limit: 5, windowMs: 60_000, now: () => now });
  // a burst from one source: two checks at once at most (the thread pool is shared), and never
  // more than the limit counted with the ones running
  const passed: string[] = [];
  let refusedConcurrency = 0;
  for (let i = 0; i < 40; i++) {
    try { l.begin('10.0.0.9'); passed.push(`begin ${i}`); } catch (err) {
      t.equal((err as { code?: string }).code, 'MOB_ERR_RATE_LIMITED');
      if (/at once/.test((err as Error).message)) refusedConcurrency++;
    }
  }
  t.equal(passed.length, 2, 'two password checks run at once, the rest are refused at once');
  t.equal(refusedConcurrency, 38);
  l.end('10.0.0.9', false);
  l.end('10.0.0.9', false);
  // sequentially: 3 more failures reach the limit of 5
  for (let i = 0; i < 3; i++) { l.begin('10.0.0.9'); l.end('10.0.0.9', false); }
  const first = (() => { try { l.begin('10.0.0.9'); return null; } catch (err) { return err as { first?: boolean; message: string }; } })();
  t.match(first, { first: true, message: /5 failed console logins from 10\.0\.0\.9/ }, 'the first refusal of the window is to be recorded');
  const second = (() => { try { l.begin('10.0.0.9'); return null; } catch (err) { return err as { first?: boolean }; } })();
  t.equal(second?.first, false, 'the ones after it are not (no audit flood)');
  // checks running count before their outcome: 4 failures + 1 running = the limit
  const l2 = new LoginLimiter({ limit: 5, windowMs: 60_000, now: () => now });
  for (let i = 0; i < 4; i++) { l2.begin('a'); l2.end('a', false); }
  l2.begin('a');
  t.throws(() => l2.begin('a'), { code: 'MOB_ERR_RATE_LIMITED', message: /1 more being checked/ }, 'a check running counts as a failure until it ends');
  l2.end('a', true);
  now += 60_000;
  t.doesNotThrow(() => { l2.begin('a'); l2.end('a', true); }, 'a new window');
});

t.test('an open page (its live stream) does not keep a session alive past its idle time', async (t) => {
  const db = ConfigDb.open(await tmpDir(t));
  t.teardown(() => db.close());
  let now = 1_000_000;
  const sm = new SessionManager(db, { idleMs: 30 * 60_000, maxAgeMs: 12 * 3600_000, now: () => now });
  const s = sm.create('bob', '127.0.0.1');
  for (let m = 0; m < 29; m++) { now += 60_000; t.ok(sm.alive(s.id)); }
  now += 2 * 60_000;
  t.notOk(sm.alive(s.id), 'asked every minute by the stream, it still ends 30 min after the last request');
  t.equal(sm.get(s.id), null);
});

/**
 * Server-side sessions of the operator console.
 *
 * A session id is 32 random bytes (base64url) that only the browser holds, in the cookie
 * `__Host-mobility-session` (Secure; HttpOnly; SameSite=Strict; Path=/). The store keeps its
 * sha256, never the id, with the operator, the source address, a per-session CSRF token and the
 * expiry: sessions survive a server restart and a copy of the database does not log anyone in.
 *
 * Expiry: idle for `idleMs` (default 1 h; each use slides it, written at most once a minute) or
 * older than `maxAgeMs` (default 12 h), whichever comes first. Logout deletes the row; a new
 * password or `operator remove` ends all of an operator's sessions (config-db.ts).
 */
import crypto from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { SessionRow } from '../config-db.js';

/** What the session manager needs from the configuration database. */
export interface SessionStore {
  putSession(s: SessionRow): void;
  getSession(idHash: string): SessionRow | null;
  extendSession(idHash: string, expiresAt: number): void;
  deleteSession(idHash: string): boolean;
  purgeSessions(nowMs: number): number;
}

export const SESSION_COOKIE = '__Host-mobility-session';

export interface Session {
  /** The cookie value (the session id); only in memory for this request. */
  id: string;
  operator: string;
  csrf: string;
  source: string;
  createdAt: number;
  expiresAt: number;
}

export interface SessionOptions {
  idleMs?: number;
  maxAgeMs?: number;
  /** Injectable clock (tests). */
  now?: () => number;
}

const hashId = (id: string) => crypto.createHash('sha256').update(id).digest('hex');

export class SessionManager {
  readonly idleMs: number;
  readonly maxAgeMs: number;
  private readonly now: () => number;
  private lastPurge = 0;

  constructor(private readonly store: SessionStore, o: SessionOptions = {}) {
    this.idleMs = o.idleMs ?? 3600_000;
    this.maxAgeMs = o.maxAgeMs ?? 12 * 3600_000;
    this.now = o.now ?? Date.now;
  }

  create(operator: string, source: string): Session {
    const t = this.now();
    const id = crypto.randomBytes(32).toString('base64url');
    const csrf = crypto.randomBytes(32).toString('base64url');
    const expiresAt = Math.min(t + this.idleMs, t + this.maxAgeMs);
    this.store.putSession({ idHash: hashId(id), operator, csrf, source, createdAt: t, expiresAt });
    return { id, operator, csrf, source, createdAt: t, expiresAt };
  }

  /** Whether the session is still live, without counting this as the operator's activity (live streams ask every tick). */
  alive(id: string | null): boolean {
    if (!id || id.length > 128) return false;
    const row = this.store.getSession(hashId(id));
    return row !== null && row !== undefined && row.expiresAt > this.now();
  }

  /** The live session of this id, its idle expiry slid forward; null when unknown or expired (an expired one is deleted). */
  get(id: string | null): Session | null {
    if (!id || id.length > 128) return null;
    const t = this.now();
    if (t - this.lastPurge > 60_000) { this.lastPurge = t; this.store.purgeSessions(t); }
    const h = hashId(id);
    const row = this.store.getSession(h);
    if (!row) return null;
    if (row.expiresAt <= t) { this.store.deleteSession(h); return null; }
    const next = Math.min(t + this.idleMs, row.createdAt + this.maxAgeMs);
    if (next - row.expiresAt >= 60_000) { this.store.extendSession(h, next); row.expiresAt = next; }
    return { id, operator: row.operator, csrf: row.csrf, source: row.source, createdAt: row.createdAt, expiresAt: row.expiresAt };
  }

  destroy(id: string): void {
    this.store.deleteSession(hashId(id));
  }

  /** The Set-Cookie value that installs the session in the browser. */
  cookie(s: Session): string {
    return `${SESSION_COOKIE}=${s.id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=${Math.floor(this.maxAgeMs / 1000)}`;
  }

  /** The Set-Cookie value that removes it. */
  static clearCookie(): string {
    return `${SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0`;
  }
}

/** The session id the request's Cookie header carries, or null. */
export function sessionIdOf(req: IncomingMessage): string | null {
  const header = req.headers.cookie;
  if (!header) return null;
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() === SESSION_COOKIE) return part.slice(eq + 1).trim() || null;
  }
  return null;
}

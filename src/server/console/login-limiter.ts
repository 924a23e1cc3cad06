/**
 * Failed console logins per source address: after `limit` failures within `windowMs` every
 * login from that address is refused (MOB_ERR_RATE_LIMITED, even with the right password)
 * until the window that began with the first failure has passed. A success does not reset
 * the count (a guesser who also knows one password gains nothing). Bounded: at most
 * `maxSources` addresses are tracked; expired entries go first, then the oldest.
 */
import { MobilityError } from '../../errors.js';

export interface LoginLimiterOptions {
  limit?: number;
  windowMs?: number;
  maxSources?: number;
  /** Injectable clock (tests). */
  now?: () => number;
}

export class LoginLimiter {
  private readonly failures = new Map<string, { count: number; since: number }>();
  private readonly limit: number;
  private readonly windowMs: number;
  private readonly maxSources: number;
  private readonly now: () => number;

  constructor(o: LoginLimiterOptions = {}) {
    this.limit = o.limit ?? 5;
    this.windowMs = o.windowMs ?? 60_000;
    this.maxSources = o.maxSources ?? 10_000;
    this.now = o.now ?? Date.now;
  }

  /** Throws MOB_ERR_RATE_LIMITED while the source is over its limit. Call before checking a password. */
  check(source: string): void {
    const f = this.failures.get(source);
    if (!f) return;
    const t = this.now();
    if (t - f.since >= this.windowMs) { this.failures.delete(source); return; }
    if (f.count >= this.limit) {
      throw new MobilityError('MOB_ERR_RATE_LIMITED', `${f.count} failed console logins from ${source} in the last ${Math.round(this.windowMs / 1000)} s; retry in ${Math.ceil((f.since + this.windowMs - t) / 1000)} s`);
    }
  }

  /** Records a failed login of the source. */
  fail(source: string): void {
    const t = this.now();
    const f = this.failures.get(source);
    if (f && t - f.since < this.windowMs) { f.count++; return; }
    this.failures.delete(source);
    if (this.failures.size >= this.maxSources) this.evict(t);
    this.failures.set(source, { count: 1, since: t });
  }

  private evict(t: number): void {
    for (const [k, v] of this.failures) if (t - v.since >= this.windowMs) this.failures.delete(k);
    // still full: the oldest entries go (Map keeps insertion order)
    for (const k of this.failures.keys()) {
      if (this.failures.size < this.maxSources) break;
      this.failures.delete(k);
    }
  }
}

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
  private readonly failures = new Map<string, { count: number; since: number; reported?: boolean }>();
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

  /** Password checks running now, per source and in all (they count against the limit before their outcome is known). */
  private readonly inFlight = new Map<string, number>();
  private inFlightAll = 0;
  /** Password checks at once, over all sources: scrypt runs in the thread pool every file operation of the server shares. */
  static readonly MAX_CONCURRENT = 2;

  /**
   * Throws MOB_ERR_RATE_LIMITED while the source is over its limit, counting the checks of the
   * source still running as failures (concurrent guesses cannot all pass before the first one is
   * counted), or when MAX_CONCURRENT checks are running already. Call before checking a password;
   * then end() exactly once with the outcome. `first` is true for the first refusal of the
   * source in its window (the caller records that one, not every one after it).
   */
  begin(source: string): void {
    const t = this.now();
    const f = this.failures.get(source);
    if (f && t - f.since >= this.windowMs) this.failures.delete(source);
    const live = this.failures.get(source);
    const pending = this.inFlight.get(source) ?? 0;
    if ((live?.count ?? 0) + pending >= this.limit) {
      const left = live ? Math.ceil((live.since + this.windowMs - t) / 1000) : Math.ceil(this.windowMs / 1000);
      const first = live !== undefined && !live.reported;
      if (live) live.reported = true;
      throw Object.assign(new MobilityError('MOB_ERR_RATE_LIMITED', `${live?.count ?? 0} failed console logins from ${source} in the last ${Math.round(this.windowMs / 1000)} s${pending ? ` (${pending} more being checked)` : ''}; retry in ${left} s`), { first });
    }
    if (this.inFlightAll >= LoginLimiter.MAX_CONCURRENT) {
      throw Object.assign(new MobilityError('MOB_ERR_RATE_LIMITED', 'too many console logins being checked at once; retry in a second'), { first: false });
    }
    this.inFlight.set(source, pending + 1);
    this.inFlightAll++;
  }

  /** The password check begun for the source is over: a failure counts against its limit. */
  end(source: string, ok: boolean): void {
    const n = (this.inFlight.get(source) ?? 1) - 1;
    if (n > 0) this.inFlight.set(source, n);
    else this.inFlight.delete(source);
    this.inFlightAll = Math.max(0, this.inFlightAll - 1);
    if (!ok) this.fail(source);
  }

  /** Throws MOB_ERR_RATE_LIMITED while the source is over its limit (no check is begun). */
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

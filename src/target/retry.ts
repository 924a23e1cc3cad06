/**
 * Retry for calls to a remote replica target (Azure storage today): one place that decides
 * whether a failed call is tried again, how long to wait, and what coded error a caller sees
 * when it gives up.
 *
 *   withRetry(fn, opts)   runs fn until it succeeds, fails for good, or the policy runs out
 *   classifyTargetError   transient / auth / quota / other, from an HTTP status, a service
 *                         error code, a socket error code or an abort
 *   backoffDelay          capped exponential backoff with jitter
 *
 * Contract:
 *   - transient failures (HTTP 408/429/500/502/503/504, ServerBusy/OperationTimedOut/InternalError,
 *     connection reset/refused/timed out, broken pipe, "socket hang up", a per-try timeout's
 *     AbortError, the SDK's REQUEST_SEND_ERROR) are retried. Attempt n (1-based) that failed is
 *     followed by a wait of backoffDelay(n) — base·2^(n-1), capped at maxDelayMs, of which the
 *     upper half is random ("equal jitter": never zero, never in lock step with other callers) —
 *     as long as fewer than maxAttempts attempts were made and the wait still ends within
 *     totalBudgetMs of the first attempt's start. When either runs out: MOB_ERR_TARGET_UNAVAILABLE,
 *     whose message carries the number of attempts and the last failure;
 *   - auth failures (HTTP 401, 403 AuthenticationFailed / AuthorizationFailure /
 *     AuthorizationPermissionMismatch / InvalidAuthenticationInfo / ...) are never retried:
 *     MOB_ERR_TARGET_AUTH at once (trying a refused key again only fills the account's logs);
 *   - quota and capacity failures (SnapshotCountExceeded, ContentLengthLargerThanTierLimit,
 *     HTTP 507, codes ending in QuotaExceeded / CapacityExceeded / LimitExceeded) are not retried
 *     here either: MOB_ERR_TARGET_QUOTA at once (freeing capacity takes a person, not a backoff);
 *     rate limits (SnapshotOperationRateExceeded, 429, ServerBusy) are transient, not quota;
 *   - everything else (404, 409 conflicts, 412, 400: answers, not outages, and a MobilityError
 *     thrown by fn) is rethrown unchanged for the caller to interpret.
 *
 * Messages never carry a secret: what is kept of a failure is its status, its code and the first
 * line of its message with any `sig=` SAS signature redacted; the raw error (whose request holds
 * the URL and headers) is not attached as `cause`.
 *
 * Time comes from a RetryClock so that tests drive it with a fake clock (no wall-clock waits),
 * and randomness from an injectable `random`.
 */
import { MobilityError } from '../errors.js';

export interface RetryPolicy {
  /** Attempts in all (1 = no retry). */
  maxAttempts: number;
  /** Wait after the first failed attempt (before jitter). */
  baseDelayMs: number;
  /** Cap of one wait. */
  maxDelayMs: number;
  /** No wait is started that would end later than this after the first attempt began. */
  totalBudgetMs: number;
}

/**
 * Defaults for a replica target: two minutes of trying (the time budget decides, not the
 * number of attempts), waits of 0.25 s growing to 15 s.
 */
export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  maxAttempts: 1000,
  baseDelayMs: 250,
  maxDelayMs: 15_000,
  totalBudgetMs: 120_000,
});

export function retryPolicy(p: Partial<RetryPolicy> = {}): RetryPolicy {
  const out = { ...DEFAULT_RETRY_POLICY, ...Object.fromEntries(Object.entries(p).filter(([, v]) => v !== undefined)) } as RetryPolicy;
  for (const k of ['maxAttempts', 'baseDelayMs', 'maxDelayMs', 'totalBudgetMs'] as const) {
    if (!Number.isFinite(out[k]) || out[k] < 0) throw new MobilityError('MOB_ERR_CONFIG', `retry policy: ${k} must be a non-negative number (got ${String(out[k])})`);
  }
  if (out.maxAttempts < 1) throw new MobilityError('MOB_ERR_CONFIG', 'retry policy: maxAttempts must be at least 1');
  return out;
}

export interface RetryClock {
  now(): number;
  sleep(ms: number): Promise<void>;
}

export const systemClock: RetryClock = {
  now: () => Date.now(),
  sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
};

export type TargetErrorKind = 'transient' | 'auth' | 'quota' | 'other';

export interface ClassifiedError {
  kind: TargetErrorKind;
  /** HTTP status, when the target answered. */
  status: number | null;
  /** Service error code (x-ms-error-code) or socket error code, when known. */
  code: string | null;
  /** One line, safe to log and to show (no secret). */
  summary: string;
}

const TRANSIENT_STATUS = new Set([408, 429, 500, 502, 503, 504]);
const TRANSIENT_CODES = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN',
  'EAI_AGAIN', 'ENOTFOUND', 'ESOCKETTIMEDOUT', 'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'REQUEST_SEND_ERROR',
  'ServerBusy', 'OperationTimedOut', 'InternalError', 'SnapshotOperationRateExceeded', 'ESHORTREAD',
]);
const AUTH_CODES = new Set([
  'AuthenticationFailed', 'AuthorizationFailure', 'AuthorizationPermissionMismatch', 'AuthorizationProtocolMismatch',
  'AuthorizationResourceTypeMismatch', 'AuthorizationServiceMismatch', 'AuthorizationSourceIPMismatch',
  'InsufficientAccountPermissions', 'InvalidAuthenticationInfo', 'NoAuthenticationInformation', 'AccountIsDisabled',
  'KeyBasedAuthenticationNotPermitted', 'AuthorizationFailed',
]);
const QUOTA_CODES = new Set([
  'SnapshotCountExceeded', 'ContentLengthLargerThanTierLimit', 'BlobTierInadequateForContentLength',
  'TotalSharesProvisionedCapacityExceedsAccountLimit', 'ShareSizeLimitReached', 'InsufficientStorage',
]);

interface ErrorLike {
  name?: unknown; message?: unknown; code?: unknown; statusCode?: unknown; status?: unknown;
  details?: { errorCode?: unknown } | null; cause?: unknown;
}

/** Removes what could be a credential from a message: SAS signatures, account keys in connection strings. */
export function redactSecrets(text: string): string {
  return text
    .replace(/([?&;]?\bsig=)[^&\s;"']+/gi, '$1REDACTED')
    .replace(/(AccountKey=)[^;\s"']+/gi, '$1REDACTED')
    .replace(/(SharedAccessSignature=)[^;\s"']+/gi, '$1REDACTED')
    .replace(/(Authorization:\s*SharedKey\s+[^:\s]+:)\S+/gi, '$1REDACTED');
}

function firstLine(s: string): string {
  const l = s.split('\n')[0].trim();
  return l.length > 300 ? `${l.slice(0, 300)}...` : l;
}

export function classifyTargetError(err: unknown): ClassifiedError {
  const e = (err && typeof err === 'object' ? err : {}) as ErrorLike;
  const status = typeof e.statusCode === 'number' ? e.statusCode : typeof e.status === 'number' ? e.status : null;
  const svcCode = typeof e.details?.errorCode === 'string' ? e.details.errorCode : null;
  const causeCode = e.cause && typeof e.cause === 'object' && typeof (e.cause as ErrorLike).code === 'string' ? (e.cause as ErrorLike).code as string : null;
  const code = svcCode ?? (typeof e.code === 'string' ? e.code : null) ?? causeCode;
  const name = typeof e.name === 'string' ? e.name : '';
  const message = redactSecrets(firstLine(typeof e.message === 'string' ? e.message : String(err)));
  const summary = [status !== null ? `HTTP ${status}` : null, code, message || name].filter(Boolean).join(' ');

  let kind: TargetErrorKind = 'other';
  if (status === 401 || (code !== null && AUTH_CODES.has(code)) || (status === 403 && (code === null || !QUOTA_CODES.has(code)))) kind = 'auth';
  else if (status === 507 || (code !== null && (QUOTA_CODES.has(code) || /(Quota|Capacity|Limit)Exceeded$/.test(code)))) kind = 'quota';
  else if ((status !== null && TRANSIENT_STATUS.has(status))
    || (code !== null && TRANSIENT_CODES.has(code))
    || (causeCode !== null && TRANSIENT_CODES.has(causeCode))
    || name === 'AbortError' || name === 'TimeoutError'
    || /socket hang up|other side closed|network socket disconnected/i.test(message)) kind = 'transient';
  return { kind, status, code, summary };
}

/** Wait after failed attempt `attempt` (1-based): min(max, base·2^(attempt-1)), its upper half random. */
export function backoffDelay(attempt: number, policy: RetryPolicy, random: () => number = Math.random): number {
  const cap = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.floor(cap / 2 + random() * (cap / 2));
}

export interface RetryOptions {
  policy: RetryPolicy;
  /** What is being done, for messages ("put pages replicas/a/d"). */
  what: string;
  clock?: RetryClock;
  random?: () => number;
  /** Called before each wait (for counting and logging); never given a secret. */
  onRetry?: (info: { attempt: number; delayMs: number; error: ClassifiedError }) => void;
  /** Builds the coded error for an auth failure (default: what + summary). */
  authError?: (c: ClassifiedError) => MobilityError;
  /** Builds the coded error for a quota failure (default: what + summary). */
  quotaError?: (c: ClassifiedError) => MobilityError;
}

/** Runs fn(attempt) under the policy; see the file comment for what is retried and what is thrown. */
export async function withRetry<T>(fn: (attempt: number) => Promise<T>, o: RetryOptions): Promise<T> {
  const clock = o.clock ?? systemClock;
  const random = o.random ?? Math.random;
  const started = clock.now();
  for (let attempt = 1; ; attempt++) {
    let err: unknown;
    try {
      return await fn(attempt);
    } catch (e) {
      err = e;
    }
    if (err instanceof MobilityError) throw err;
    const c = classifyTargetError(err);
    if (c.kind === 'auth') {
      throw o.authError?.(c) ?? new MobilityError('MOB_ERR_TARGET_AUTH', `${o.what}: the target refused the credentials (${c.summary})`);
    }
    if (c.kind === 'quota') {
      throw o.quotaError?.(c) ?? new MobilityError('MOB_ERR_TARGET_QUOTA', `${o.what}: the target is out of capacity (${c.summary})`);
    }
    if (c.kind !== 'transient') throw err;
    const delayMs = backoffDelay(attempt, o.policy, random);
    const elapsed = clock.now() - started;
    if (attempt >= o.policy.maxAttempts || elapsed + delayMs > o.policy.totalBudgetMs) {
      throw new MobilityError('MOB_ERR_TARGET_UNAVAILABLE',
        `${o.what}: gave up after ${attempt} attempt${attempt === 1 ? '' : 's'} in ${elapsed} ms; last failure: ${c.summary}`);
    }
    o.onRetry?.({ attempt, delayMs, error: c });
    await clock.sleep(delayMs);
  }
}

/**
 * The retry layer of remote replica targets (src/target/retry.ts), on a fake clock: what is
 * retried, how long it waits, when it gives up and with which code, and that no secret
 * survives into a message.
 */
import t from 'tap';
import { MobilityError } from '../../src/errors.js';
import { backoffDelay, classifyTargetError, redactSecrets, retryPolicy, withRetry, type RetryClock } from '../../src/target/retry.js';

function fakeClock(): RetryClock & { slept: number[] } {
  let now = 1_000_000;
  const slept: number[] = [];
  return { slept, now: () => now, sleep: async (ms) => { slept.push(ms); now += ms; } };
}

const status = (statusCode: number, errorCode?: string) =>
  Object.assign(new Error(`status ${statusCode}`), { statusCode, details: errorCode ? { errorCode } : undefined });

t.test('classification: transient, auth, quota, other', async (t) => {
  for (const s of [408, 429, 500, 502, 503, 504]) t.equal(classifyTargetError(status(s)).kind, 'transient', `HTTP ${s}`);
  t.equal(classifyTargetError(Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' })).kind, 'transient', 'a reset');
  t.equal(classifyTargetError(Object.assign(new Error('x'), { name: 'AbortError' })).kind, 'transient', 'a per-try timeout');
  t.equal(classifyTargetError(new Error('socket hang up')).kind, 'transient', 'a hang-up');
  t.equal(classifyTargetError(status(403, 'AuthenticationFailed')).kind, 'auth');
  t.equal(classifyTargetError(status(401)).kind, 'auth');
  t.equal(classifyTargetError(status(409, 'SnapshotCountExceeded')).kind, 'quota');
  t.equal(classifyTargetError(status(507)).kind, 'quota');
  t.equal(classifyTargetError(status(503, 'ServerBusy')).kind, 'transient', 'throttling is transient, not quota');
  t.equal(classifyTargetError(status(404, 'BlobNotFound')).kind, 'other', 'an answer is not an outage');
  t.equal(classifyTargetError(status(412)).kind, 'other');
});

t.test('backoff: capped exponential with equal jitter, never zero', async (t) => {
  const p = retryPolicy({ baseDelayMs: 100, maxDelayMs: 1000 });
  t.equal(backoffDelay(1, p, () => 0), 50, 'first wait: half of base at the lowest');
  t.equal(backoffDelay(1, p, () => 0.999999), 99);
  t.equal(backoffDelay(3, p, () => 0), 200, 'third: base * 4, lower half');
  t.equal(backoffDelay(20, p, () => 0), 500, 'capped at maxDelayMs');
  t.ok(backoffDelay(20, p, () => 0.999999) <= 1000);
  t.throws(() => retryPolicy({ maxAttempts: 0 }), { code: 'MOB_ERR_CONFIG' });
  t.throws(() => retryPolicy({ baseDelayMs: -1 }), { code: 'MOB_ERR_CONFIG' });
});

t.test('withRetry: transient until success; attempts and budget bound it; auth and quota at once; answers unchanged', async (t) => {
  const clock = fakeClock();
  let n = 0;
  const retries: number[] = [];
  const v = await withRetry(async () => { if (++n < 4) throw status(503); return 'ok'; }, {
    policy: retryPolicy({ maxAttempts: 5, baseDelayMs: 100, maxDelayMs: 1000, totalBudgetMs: 60_000 }), what: 'put pages x', clock,
    random: () => 0, onRetry: ({ attempt }) => retries.push(attempt),
  });
  t.equal(v, 'ok');
  t.same(retries, [1, 2, 3], 'retried three times');
  t.same(clock.slept, [50, 100, 200], 'waiting longer each time');

  const c2 = fakeClock();
  let tries = 0;
  const e = await withRetry(async () => { tries++; throw status(500); }, {
    policy: retryPolicy({ maxAttempts: 4, baseDelayMs: 10, maxDelayMs: 10, totalBudgetMs: 60_000 }), what: 'download y', clock: c2, random: () => 0,
  }).catch((x: unknown) => x);
  t.equal((e as MobilityError).code, 'MOB_ERR_TARGET_UNAVAILABLE');
  t.equal(tries, 4, 'maxAttempts tries in all');
  t.match((e as Error).message, /download y: gave up after 4 attempts/);
  t.match((e as Error).message, /HTTP 500/, 'the last failure is named');

  const c3 = fakeClock();
  let budgetTries = 0;
  await withRetry(async () => { budgetTries++; throw status(503); }, {
    policy: retryPolicy({ maxAttempts: 100, baseDelayMs: 1000, maxDelayMs: 1000, totalBudgetMs: 3000 }), what: 'z', clock: c3, random: () => 0.999,
  }).catch(() => undefined);
  t.ok(c3.slept.reduce((a, b) => a + b, 0) <= 3000, 'no wait ends past the time budget');
  t.ok(budgetTries < 100, `the budget stopped it after ${budgetTries} tries`);

  let authTries = 0;
  const a = await withRetry(async () => { authTries++; throw status(403, 'AuthorizationPermissionMismatch'); }, { policy: retryPolicy(), what: 'w', clock: fakeClock() }).catch((x: unknown) => x);
  t.equal((a as MobilityError).code, 'MOB_ERR_TARGET_AUTH');
  t.equal(authTries, 1, 'auth is not retried');
  let quotaTries = 0;
  const q = await withRetry(async () => { quotaTries++; throw status(409, 'SnapshotCountExceeded'); }, { policy: retryPolicy(), what: 'w', clock: fakeClock() }).catch((x: unknown) => x);
  t.equal((q as MobilityError).code, 'MOB_ERR_TARGET_QUOTA');
  t.equal(quotaTries, 1, 'quota is not retried');
  const nf = status(404, 'BlobNotFound');
  t.equal(await withRetry(async () => { throw nf; }, { policy: retryPolicy(), what: 'w', clock: fakeClock() }).catch((x: unknown) => x), nf, 'a 404 comes back unchanged');
  const coded = new MobilityError('MOB_ERR_OUT_OF_RANGE', 'x');
  t.equal(await withRetry(async () => { throw coded; }, { policy: retryPolicy(), what: 'w', clock: fakeClock() }).catch((x: unknown) => x), coded, 'a coded error is not retried');
});

t.test('the default policy: the time budget decides, not a count of attempts', async (t) => {
  const clock = fakeClock();
  const e = await withRetry(async () => { throw status(503); }, { policy: retryPolicy(), what: 'w', clock }).catch((x: unknown) => x);
  t.equal((e as MobilityError).code, 'MOB_ERR_TARGET_UNAVAILABLE');
  const waited = clock.slept.reduce((a, b) => a + b, 0);
  t.ok(waited > 100_000 && waited <= 120_000, `an outage is retried for close to the 2-minute budget (${waited} ms of waits)`);
  const longer = fakeClock();
  await withRetry(async () => { throw status(503); }, { policy: retryPolicy({ totalBudgetMs: 600_000 }), what: 'w', clock: longer }).catch(() => undefined);
  t.ok(longer.slept.reduce((a, b) => a + b, 0) > 500_000, 'a longer budget (--store-retry 10m) retries longer');
});

t.test('no secret in a message', async (t) => {
  const sas = 'sv=2023-01-03&ss=b&sig=AbCdEf%2B123secret%3D&se=2030';
  t.notMatch(redactSecrets(`GET https://a.blob.core.windows.net/c/b?${sas} failed`), /AbCdEf/);
  t.notMatch(redactSecrets('DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0a2V5Cg==;EndpointSuffix=x'), /c2VjcmV0/);
  t.notMatch(redactSecrets('Authorization: SharedKey acct:bWFjc2lnbmF0dXJl'), /bWFjc2ln/);
  const e = await withRetry(async () => { throw Object.assign(new Error(`request to https://x/c?${sas} failed`), { statusCode: 500 }); }, {
    policy: retryPolicy({ maxAttempts: 1 }), what: 'w', clock: fakeClock(),
  }).catch((x: unknown) => x);
  t.notMatch((e as Error).message, /AbCdEf/, 'the coded error carries no SAS signature');
  t.equal((e as Error).cause, undefined, 'and not the raw error (whose request holds the URL and headers)');
});

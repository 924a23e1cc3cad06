/**
 * RetryingPageBlobOps.copyFrom: a server-side copy is followed until it ends; one whose progress
 * does not move for copyStallMs is given up with CopyFailedError('stalled') (the backend then
 * copies page ranges itself), while a slow copy that moves on is waited for. No Azure needed:
 * the inner operations are a scripted fake, the clock is virtual.
 */
import t from 'tap';
import { CopyFailedError, RetryingPageBlobOps, type BlobInfo, type PageBlobOps } from '../../../src/target/azure/page-client.js';

const aborted: string[] = [];

function fake(progress: (poll: number) => { status: string; progress: string }): { ops: PageBlobOps; polls: () => number } {
  let polls = 0;
  const impl: Partial<PageBlobOps> = {
    containerUrl: 'http://127.0.0.1:1/acct/c',
    startCopy: async () => ({ status: 'pending' }),
    abortCopy: async (_dest, id) => { aborted.push(id); },
    properties: async (ref): Promise<BlobInfo> => {
      const p = progress(++polls);
      return { name: ref.name, snapshot: null, sizeBytes: 1 << 20, metadata: {}, copyStatus: p.status, copyStatusDescription: null, copyProgress: p.progress, copyId: 'copy-1' };
    },
  };
  const ops = new Proxy(impl, { get: (o, k) => (k in o ? o[k as keyof PageBlobOps] : () => { throw new Error(`unexpected call ${String(k)}`); }) }) as PageBlobOps;
  return { ops, polls: () => polls };
}

function clock() {
  let now = 0;
  return { now: () => now, sleep: async (ms: number) => { now += ms; } };
}

t.test('a copy whose progress stays put is given up after the stall bound', async (t) => {
  const f = fake(() => ({ status: 'pending', progress: '512/1048576' }));
  const ops = new RetryingPageBlobOps(f.ops, { target: 'test', authFix: 'n/a', clock: clock(), copyStallMs: 60_000 });
  const err = await ops.copyFrom('dest', { name: 'src', snapshot: 'x' }, {}).then(() => null, (e: unknown) => e);
  t.ok(err instanceof CopyFailedError, `CopyFailedError: ${String(err)}`);
  t.equal((err as CopyFailedError).status, 'stalled');
  t.match((err as Error).message, /no progress for 60 s/);
  t.same(aborted, ['copy-1'], 'the stalled copy was aborted (Abort Copy Blob with its copy id)');
  t.ok(f.polls() < 60, `polled ${f.polls()} times (backoff up to 2 s between polls)`);
});

t.test('a slow copy that moves on is waited for, however long it takes', async (t) => {
  const f = fake((n) => (n < 200 ? { status: 'pending', progress: `${n * 512}/1048576` } : { status: 'success', progress: '1048576/1048576' }));
  const ops = new RetryingPageBlobOps(f.ops, { target: 'test', authFix: 'n/a', clock: clock(), copyStallMs: 60_000 });
  await ops.copyFrom('dest', { name: 'src', snapshot: 'x' }, {});
  t.equal(f.polls(), 200, 'followed to the end (about 400 s of virtual time, past the stall bound)');
});

t.test('a failed copy is reported as failed', async (t) => {
  const f = fake((n) => (n < 3 ? { status: 'pending', progress: `${n}/10` } : { status: 'failed', progress: '3/10' }));
  const ops = new RetryingPageBlobOps(f.ops, { target: 'test', authFix: 'n/a', clock: clock() });
  const err = await ops.copyFrom('dest', { name: 'src' }, {}).then(() => null, (e: unknown) => e);
  t.ok(err instanceof CopyFailedError);
  t.equal((err as CopyFailedError).status, 'failed');
});

import { spawn, type ChildProcess } from 'node:child_process';
import { CLI_PATH, spawnServer, stopServer, type SpawnedServer } from '../src/server/spawn.js';
import { cleanup } from './cleanup.js';

export { cleanup, removeTraceInstances, scratchRoot, sweep, traceInstancesOf, type Cleanup } from './cleanup.js';

interface TestLike { teardown(fn: () => unknown): void; comment?(...args: unknown[]): void }

/**
 * A fresh directory under this test process's scratch root, removed at the end of the test
 * (after anything mounted under it is unmounted and any loop device backed by a file in it
 * is detached). See cleanup.ts.
 */
export async function tmpDir(t: TestLike, prefix = 'tmp-'): Promise<string> {
  return cleanup(t).dir(prefix);
}

export interface CliRun { child: ChildProcess; done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> }

/**
 * Runs the mobility CLI as a real child process (killed with the test process if it is still
 * running then), with this process's environment or `env`.
 */
export function runCli(args: string[], env?: NodeJS.ProcessEnv): CliRun {
  const child = spawn(process.execPath, [CLI_PATH, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
  cleanup().process(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) => {
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

/**
 * `mobility server` as a child process of this test: stopped (SIGTERM, then SIGKILL) when the
 * test ends, SIGKILLed with the test process on a timeout or signal.
 */
export async function startServer(t: TestLike, dataDir: string, opts: Parameters<typeof spawnServer>[1] = {}): Promise<SpawnedServer> {
  const s = await spawnServer(dataDir, { timeoutMs: 120_000, ...opts });
  cleanup(t).process(s.child);
  t.teardown(() => stopGently(s.child));
  return s;
}

/** SIGTERM, then SIGKILL if the process has not exited after graceMs. Resolves once it exited. */
export function stopGently(child: ChildProcess, graceMs = 30_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const k = setTimeout(() => child.kill('SIGKILL'), graceMs);
    child.once('exit', () => { clearTimeout(k); resolve(); });
    child.kill('SIGTERM');
  });
}

export { stopServer };

export function replicateArgs(o: { url: string; tokenFile: string; caFile: string; disk: string; stateDir: string; agentId?: string; extra?: string[] }): string[] {
  return ['replicate', '--server', o.url, '--token-file', o.tokenFile, '--ca', o.caFile, '--disk', o.disk, '--state-dir', o.stateDir,
    '--agent-id', o.agentId ?? 'agent1', '--json', '--json-logs', ...(o.extra ?? [])];
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Polls cond every 50 ms. timeoutMs is a safety net against a hang, not a speed
 * requirement: give it generously (the file's own timeout is 300 s).
 */
export async function waitFor(cond: () => Promise<boolean> | boolean, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** Seeded PRNG (mulberry32): the same sequence for the same seed (workloads a test or benchmark replays). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

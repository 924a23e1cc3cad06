import { spawn, type ChildProcess } from 'node:child_process';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CLI_PATH } from '../src/server/spawn.js';

export async function tmpDir(t: { teardown(fn: () => unknown): void }, prefix = 'mobility-test-'): Promise<string> {
  const d = await fsp.mkdtemp(path.join(os.tmpdir(), prefix));
  t.teardown(() => fsp.rm(d, { recursive: true, force: true }));
  return d;
}

export interface CliRun { child: ChildProcess; done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> }

/** Runs the mobility CLI as a real child process. */
export function runCli(args: string[]): CliRun {
  const child = spawn(process.execPath, [CLI_PATH, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) => {
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

export function replicateArgs(o: { url: string; tokenFile: string; caFile: string; disk: string; stateDir: string; agentId?: string; extra?: string[] }): string[] {
  return ['replicate', '--server', o.url, '--token-file', o.tokenFile, '--ca', o.caFile, '--disk', o.disk, '--state-dir', o.stateDir,
    '--agent-id', o.agentId ?? 'agent1', '--json', '--json-logs', ...(o.extra ?? [])];
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(cond: () => Promise<boolean> | boolean, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

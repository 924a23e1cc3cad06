/**
 * Starts `mobility server` as a child process and waits for its "listening"
 * line. Used by the demo, the end-to-end tests and the benchmark.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import readline from 'node:readline';

export const CLI_PATH = fileURLToPath(new URL('../cli/main.js', import.meta.url));

export interface ServerInfo { url: string; port: number; dataDir: string; tokenFile: string; caFile: string | null; fingerprint: string | null }

export interface SpawnedServer { child: ChildProcess; info: ServerInfo; stderr: () => string }

export async function spawnServer(dataDir: string, opts: { port?: number; extraArgs?: string[]; timeoutMs?: number } = {}): Promise<SpawnedServer> {
  const child = spawn(process.execPath, [CLI_PATH, 'server', '--data-dir', dataDir, '--listen', `127.0.0.1:${opts.port ?? 0}`, '--json-logs', ...(opts.extraArgs ?? [])], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    if (err.length > 1 << 20) err = err.slice(-(1 << 19));
  });
  const rl = readline.createInterface({ input: child.stdout! });
  const info = await new Promise<ServerInfo>((resolve, reject) => {
    // a server that did not start in time is killed, never left running unseen by the caller
    const t = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`server did not start: ${err}`)); }, opts.timeoutMs ?? 30_000);
    rl.once('line', (line) => {
      clearTimeout(t);
      try { resolve(JSON.parse(line) as ServerInfo); } catch { reject(new Error(`unexpected server output: ${line}`)); }
    });
    child.once('exit', (code) => { clearTimeout(t); reject(new Error(`server exited with ${code}: ${err}`)); });
  });
  return { child, info, stderr: () => err };
}

export async function stopServer(s: SpawnedServer, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if (s.child.exitCode !== null || s.child.signalCode !== null) return s.child.exitCode;
  return new Promise((resolve) => {
    s.child.once('exit', (code) => resolve(code));
    s.child.kill(signal);
  });
}

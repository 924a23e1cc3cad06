/**
 * A private Azurite (the Azure storage emulator, blob service only) on 127.0.0.1 for tests of
 * the Azure replica backend: its own data directory, a free port, the published development
 * account. Azurite is a devDependency; if it cannot start the test FAILS (never skips).
 *
 *   const az = await startAzurite(t);            // registered with the test's cleanup scope
 *   az.url                                       // http://127.0.0.1:PORT/devstoreaccount1
 *   await az.kill('SIGKILL');                    // dies at once, requests in flight are cut
 *   await az.restart();                          // same data directory, same port
 *   const file = await writeCredentialsFile(dir, az);   // 0600 JSON for loadAzureCredentials
 *
 * Cleanup: the process is spawned through test/cleanup.ts in its own process group, so it is
 * SIGKILLed when the test's scope ends, when the test process is killed by a tap timeout, or
 * by the reaper after the test process died any other way.
 *
 * Durability of acknowledged writes across kill -9: Azurite keeps its metadata (blobs, page
 * ranges, extents) in LokiJS databases held in memory and saved to disk every 5 s. A plain
 * SIGKILL therefore loses up to 5 s of requests Azurite had already answered with success,
 * which real Azure never does, and a test of "nothing acknowledged is lost" would fail for the
 * emulator's sake. So Azurite runs under a small wrapper (this file, run as
 * `node azurite.js --serve ARGS`) that records Azurite's LokiJS databases, and kill('SIGKILL')
 * asks it over IPC to write them synchronously and then SIGKILL itself, all in one turn of its
 * event loop: no request is answered between the save and the death, requests in flight are
 * cut exactly as by a crash, and what was answered survives, as on the real service. Pass
 * { flush: false } to see the emulator's raw behaviour.
 */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { cleanup, type Cleanup } from './cleanup.js';

export const AZURITE_ACCOUNT = 'devstoreaccount1';
/** The emulator's published development key (documented by Microsoft; not a secret). */
export const AZURITE_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

const THIS_FILE = fileURLToPath(import.meta.url);
/** A safety net against a hang, not a speed requirement. */
const START_TIMEOUT_MS = 90_000;

export interface Azurite {
  /** http://127.0.0.1:PORT/devstoreaccount1 */
  readonly url: string;
  readonly accountName: string;
  readonly accountKey: string;
  /** Azurite's data directory. */
  readonly location: string;
  readonly port: number;
  /** The running process (changes with restart()); 0 while it is down. */
  readonly pid: number;
  /**
   * Sends a signal and waits for the process to exit. SIGKILL (the default) first has the
   * wrapper save Azurite's metadata synchronously (see the file comment) unless flush is false.
   */
  kill(signal?: NodeJS.Signals, o?: { flush?: boolean }): Promise<void>;
  /** Starts Azurite again on the same location and the same port (stopping it first if it runs). */
  restart(): Promise<void>;
  /** Stops Azurite gracefully (SIGTERM; SIGKILL after 30 s). */
  stop(): Promise<void>;
}

interface TestLike { teardown(fn: () => unknown): void; comment?(...args: unknown[]): void }

function azuritePaths(): { main: string; pkgJson: string } {
  const require = createRequire(import.meta.url);
  let pkgJson: string;
  try {
    pkgJson = require.resolve('azurite/package.json');
  } catch {
    throw new Error('this test needs Azurite (a devDependency of this repository): run npm ci');
  }
  const pkg = JSON.parse(fs.readFileSync(pkgJson, 'utf8')) as { bin?: Record<string, string> };
  const rel = pkg.bin?.['azurite-blob'] ?? './dist/src/blob/main.js';
  return { main: path.resolve(path.dirname(pkgJson), rel), pkgJson };
}

/** Starts a private Azurite blob service (see the file comment). Throws when it cannot start. */
export async function startAzurite(t: TestLike, opts: { location?: string } = {}): Promise<Azurite> {
  const c: Cleanup = cleanup(t);
  const location = opts.location ?? c.dir('azurite-');
  await fsp.mkdir(location, { recursive: true, mode: 0o700 });
  let child: ChildProcess | null = null;
  let port = 0;

  const launch = async (wantPort: number): Promise<void> => {
    let lastErr = '';
    for (let attempt = 0; attempt < 5; attempt++) {
      const args = [THIS_FILE, '--serve', '--location', location, '--blobHost', '127.0.0.1', '--blobPort', String(wantPort),
        '--skipApiVersionCheck', '--disableTelemetry', '--silent'];
      const ch = c.spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe', 'ipc'] });
      let out = '';
      let err = '';
      const listening = await new Promise<number | null>((resolve) => {
        const timer = setTimeout(() => resolve(null), START_TIMEOUT_MS);
        const done = (v: number | null) => { clearTimeout(timer); resolve(v); };
        ch.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /successfully listens on http:\/\/127\.0\.0\.1:(\d+)/.exec(out);
          if (m) done(Number(m[1]));
        });
        ch.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
        ch.once('exit', () => done(null));
        ch.once('error', (e) => { err += e.message; done(null); });
      });
      if (listening !== null && ch.exitCode === null && ch.signalCode === null) {
        // keep draining its output so a chatty Azurite never blocks on a full pipe
        ch.stdout!.resume();
        ch.stderr!.resume();
        child = ch;
        port = listening;
        return;
      }
      if (ch.exitCode === null && ch.signalCode === null) {
        ch.kill('SIGKILL');
        await new Promise((r) => ch.once('exit', r));
      }
      lastErr = `${out}${err}`.trim();
      // the port of a killed Azurite can be taken by another process: only that is worth another try
      if (!/EADDRINUSE|address already in use/i.test(lastErr) || wantPort === 0) break;
      await new Promise((r) => setTimeout(r, 250 * (attempt + 1)));
    }
    throw new Error(`Azurite did not start (location ${location}, port ${wantPort || 'any'}): ${lastErr.slice(-2000) || 'no output'}`);
  };

  const waitExit = (ch: ChildProcess, graceMs: number): Promise<void> => new Promise((resolve) => {
    if (ch.exitCode !== null || ch.signalCode !== null) return resolve();
    const k = setTimeout(() => { try { process.kill(-ch.pid!, 'SIGKILL'); } catch { /* gone */ } }, graceMs);
    ch.once('exit', () => { clearTimeout(k); resolve(); });
  });

  const az: Azurite = {
    get url() { return `http://127.0.0.1:${port}/${AZURITE_ACCOUNT}`; },
    accountName: AZURITE_ACCOUNT,
    accountKey: AZURITE_KEY,
    location,
    get port() { return port; },
    get pid() { return child && child.exitCode === null && child.signalCode === null ? child.pid ?? 0 : 0; },
    async kill(signal: NodeJS.Signals = 'SIGKILL', o: { flush?: boolean } = {}) {
      const ch = child;
      if (!ch || ch.exitCode !== null || ch.signalCode !== null) return;
      if (signal === 'SIGKILL' && o.flush !== false && ch.connected) {
        ch.send('crash');
      } else {
        try { process.kill(-ch.pid!, signal); } catch { /* gone */ }
      }
      await waitExit(ch, 30_000);
    },
    async restart() {
      if (child && child.exitCode === null && child.signalCode === null) await az.stop();
      await launch(port);
    },
    async stop() {
      const ch = child;
      if (!ch || ch.exitCode !== null || ch.signalCode !== null) return;
      try { process.kill(ch.pid!, 'SIGTERM'); } catch { /* gone */ }
      await waitExit(ch, 30_000);
    },
  };
  await launch(0);
  t.teardown(() => az.stop());
  return az;
}

/** Writes a 0600 JSON credentials file ({accountName, accountKey}) for the emulator; returns its path. */
export async function writeCredentialsFile(dir: string, az: Pick<Azurite, 'accountName' | 'accountKey'>, name = 'azure-credentials.json'): Promise<string> {
  const file = path.join(dir, name);
  await fsp.writeFile(file, JSON.stringify({ accountName: az.accountName, accountKey: az.accountKey }) + '\n', { mode: 0o600 });
  await fsp.chmod(file, 0o600);
  return file;
}

// ---------------------------------------------------------------------------------------------
// the wrapper: `node azurite.js --serve AZURITE-ARGS` runs Azurite's blob service in this
// process and, on the IPC message 'crash', saves its LokiJS databases synchronously and SIGKILLs itself

interface LokiLike { filename: string; persistenceMethod?: string; serialize(): string; [k: string]: unknown }

function serve(args: string[]): void {
  const { main, pkgJson } = azuritePaths();
  const require = createRequire(pkgJson);
  const Loki = require('lokijs') as { prototype: Record<string, unknown>; LokiFsAdapter?: { prototype: Record<string, unknown> } };
  // LokiJS's own save is asynchronous (write DB~, then rename over DB): a rename still in flight
  // when the crash save below runs would put the older copy back over it. Saved synchronously,
  // nothing of an autosave can be in flight when the 'crash' message is handled.
  if (Loki.LokiFsAdapter) {
    Loki.LokiFsAdapter.prototype.saveDatabase = function (dbname: string, dbstring: string, callback: (err?: Error) => void) {
      try {
        fs.writeFileSync(`${dbname}~`, dbstring);
        fs.renameSync(`${dbname}~`, dbname);
      } catch (err) {
        callback(err as Error);
        return;
      }
      callback();
    };
  }
  // every database Azurite uses: each one's init calls getCollection (loadDatabase only runs when
  // its file already exists, so a fresh location would be missed by patching that alone)
  const dbs = new Set<LokiLike>();
  for (const m of ['loadDatabase', 'getCollection', 'addCollection']) {
    const orig = Loki.prototype[m] as (...a: unknown[]) => unknown;
    Loki.prototype[m] = function (this: LokiLike, ...a: unknown[]) {
      dbs.add(this);
      return orig.apply(this, a);
    };
  }
  process.on('message', (m) => {
    if (m !== 'crash') return;
    for (const db of dbs) {
      if (db.persistenceMethod && db.persistenceMethod !== 'fs') continue;
      try { fs.writeFileSync(db.filename, db.serialize()); } catch { /* a crash saves what it can */ }
    }
    process.kill(process.pid, 'SIGKILL');
  });
  // a graceful stop: Azurite closes (and saves) by itself; the IPC channel must not keep this process alive
  let stopping = false;
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.once(sig, () => {
      stopping = true;
      if (process.connected) process.disconnect();
    });
  }
  // the test process is gone: nobody needs this Azurite any more
  process.on('disconnect', () => { if (!stopping) process.kill(process.pid, 'SIGKILL'); });
  process.argv = [process.argv[0], main, ...args];
  require(main);
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href && process.argv[2] === '--serve') {
  serve(process.argv.slice(3));
}

/**
 * Shared by the pull-install bundle tests (install-script, install-stub): builds the bundle once
 * per test file with scripts/package.sh, unpacks it, and hands out empty prefixes to install into.
 * Split in two files so that each stays well under tap's per-file limit on a loaded machine.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// compiled to dist/test/install/: the repository is three levels up
export const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
export const GOLDEN_DIR = path.join(ROOT, 'test', 'install', 'golden');
export const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
export const SERVER = 'wss://appliance.example:8443';

export interface Run { code: number | null; stdout: string; stderr: string }

export function run(cmd: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env }, cwd: os.tmpdir() });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

export const lastLine = (s: string) => s.trimEnd().split('\n').at(-1) ?? '';

/** Every path under dir with its type, mode and link target, sorted by path. */
export async function listing(dir: string): Promise<string[]> {
  const out: [string, string][] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await fsp.readdir(path.join(dir, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      const st = await fsp.lstat(path.join(dir, r));
      const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
      if (st.isSymbolicLink()) out.push([r, `l ${mode} ${r} -> ${await fsp.readlink(path.join(dir, r))}`]);
      else if (st.isDirectory()) { out.push([r, `d ${mode} ${r}`]); await walk(r); }
      else out.push([r, `f ${mode} ${r}`]);
    }
  };
  await walk('');
  return out.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map((e) => e[1]);
}

// packaging plus some twenty real installs: more than tap's default 300 s on a busy machine

export interface Bundle {
  work: string; pkg: Run; packMs: number; tarball: string; BUNDLE: string; INSTALL: string; UNINSTALL: string;
  emptyPrefix: () => Promise<string>;
}

/** Packages and unpacks the bundle (removed when the file's tests end). */
export async function makeBundle(): Promise<Bundle> {
  // packaging plus a dozen real installs: more than tap's default on a busy machine
  t.setTimeout(10 * 60 * 1000);
  const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-install-test-'));
  t.teardown(() => fsp.rm(work, { recursive: true, force: true }));
  // The test runs from dist/, which `npm run build` just produced: rebuilding
  // here would rewrite files that concurrently running test files are loading.
  const t0 = Date.now();
  const pkg = await run('bash', [path.join(ROOT, 'scripts', 'package.sh'), '--skip-build', '--out-dir', path.join(work, 'out')]);
  if (pkg.code !== 0) throw new Error(`package.sh failed (${pkg.code}): ${pkg.stdout}\n${pkg.stderr}`);
  const packMs = Date.now() - t0;
  const tarball = path.join(work, 'out', `mobility-agent-${VERSION}-linux-${process.arch}.tar.gz`);
  await fsp.mkdir(path.join(work, 'unpacked'));
  const untar = await run('tar', ['-C', path.join(work, 'unpacked'), '-xzf', tarball]);
  if (untar.code !== 0) throw new Error(`tar failed: ${untar.stderr}`);
  const BUNDLE = path.join(work, 'unpacked', `mobility-agent-${VERSION}`);
  let prefixes = 0;
  const emptyPrefix = async (): Promise<string> => {
    const d = path.join(work, `prefix-${++prefixes}`);
    await fsp.mkdir(d);
    return d;
  };
  return { work, pkg, packMs, tarball, BUNDLE, INSTALL: path.join(BUNDLE, 'install.sh'), UNINSTALL: path.join(BUNDLE, 'uninstall.sh'), emptyPrefix };
}
